"""`python -m splitcore.prepare`: resolve the model that the settings name (download it or build it) once, before
several processes start and race for it. Reads the same flags and environment variables as the servers
(ModelConfig: --model / GPT2_MODEL, --models-dir / GPT2_MODELS_DIR, --fallback-random / GPT2_FALLBACK_RANDOM) and
prints one line saying what it resolved, and where."""

from __future__ import annotations

import argparse
import logging
import sys

from splitcore.errors import SplitError
from splitcore.models import resolve_with_fallback
from splitcore.settings import ModelConfig, dataclass_flags


def main(argv: list[str] | None = None, prefix: str = "[prepare]") -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m splitcore.prepare", description=__doc__.split("\n\n")[0])
    dataclass_flags(p, ModelConfig)
    p.add_argument("--prefix", default=prefix, help="what the line printed starts with")
    args = p.parse_args(argv)
    try:
        m = resolve_with_fallback(args.model, args.models_dir, args.fallback_random)
    except SplitError as e:
        print(f"{args.prefix} error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.prefix} model {m.spec} at {m.path}" + (" (RANDOM WEIGHTS)" if m.is_random else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
