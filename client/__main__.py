"""Entry point: `python -m client` (the Gradio app), or its commands: generate, api, train."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see splitcore.device

from client.cli import main  # noqa: E402

main()
