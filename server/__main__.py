"""Entry point: `python -m server` (see `python -m server --help`)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see splitcore.device

from server.app import main  # noqa: E402

main()
