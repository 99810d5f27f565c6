"""Entry point: `python -m client` (Gradio app) or `python -m client generate PROMPT`."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see splitcore.runtime

from client.cli import main  # noqa: E402

main()
