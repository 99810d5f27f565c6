#!/usr/bin/env bash
# Create .venv and install what the project needs, once; later calls return at once.
# Usage: source scripts/ensure_env.sh [dev]    (dev adds the test tools)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
want="runtime"
[[ "${1:-}" == "dev" ]] && want="dev"
stamp="$VENV/.installed-$want"
reqs=("$ROOT/requirements.txt")
[[ "$want" == "dev" ]] && reqs+=("$ROOT/requirements-dev.txt")
sum="$(cat "${reqs[@]}" | sha256sum | cut -c1-16)"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]]; then
  echo "[setup] installing dependencies into $VENV (first run only; a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, pinned: on a CPU-only machine with a local wheel this takes it; elsewhere PyPI's build.
  "$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' "$ROOT/requirements.txt")" >&2
  for r in "${reqs[@]}"; do "$VENV/bin/python" -m pip install -q -r "$r" >&2; done
  echo "$sum" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$ROOT"
