"""Entry point: `python -m server` (see `python -m server --help`)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see splitcore.device

from server.config import parse_config  # noqa: E402

cfg = parse_config()  # --help and a bad flag answer before torch and gRPC load

from server.app import main  # noqa: E402

main(cfg=cfg)
