"""Entry point: `python -m baseline` (Gradio app) or `python -m baseline generate PROMPT`."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see splitcore.device

from baseline.cli import main  # noqa: E402

main()
