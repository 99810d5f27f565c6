#!/usr/bin/env bash
# Run the whole test suite (lint, stub check, unit, gRPC and browser tests) on a machine with nothing set up.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh" dev
echo "[test] ruff" >&2
ruff check . && ruff format --check -q .
echo "[test] pytest" >&2
python -m pytest "$@"
