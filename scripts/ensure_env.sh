#!/usr/bin/env bash
# Create .venv and install what the project needs, once; later calls return at once.
# Usage: source scripts/ensure_env.sh [dev]    (dev adds the test tools; a venv set up for dev has the runtime set)
# Sourced into an interactive shell it changes no shell option (no `set -e` left behind); it puts .venv first on
# PATH, the repository on PYTHONPATH, and changes to the repository's root.
_gpt2_ensure_env() {
  local root venv py want stamp sum dev_sum r
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  venv="$root/.venv"
  py="${PYTHON:-python3}"
  want="runtime"
  [[ "${1:-}" == "dev" ]] && want="dev"
  local reqs=("$root/requirements.txt")
  [[ "$want" == "dev" ]] && reqs+=("$root/requirements-dev.txt")
  stamp="$venv/.installed-$want"
  sum="$(cat "${reqs[@]}" | sha256sum | cut -c1-16)"
  # The dev set includes the runtime set: a venv set up for dev (from these same files) needs nothing more.
  dev_sum="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)"
  if [[ "$want" == "runtime" && "$(cat "$venv/.installed-dev" 2>/dev/null)" == "$dev_sum" ]]; then
    stamp="$venv/.installed-dev" sum="$dev_sum"
  fi

  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv" >&2
    "$py" -m venv "$venv" || { echo "[setup] error: could not create $venv with $py" >&2; return 1; }
  fi
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]]; then
    echo "[setup] installing dependencies into $venv (first run only; a few minutes)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2 || return 1
    # torch first, pinned: on a CPU-only machine with a local wheel this takes it; elsewhere PyPI's build.
    "$venv/bin/python" -m pip install -q "$(grep -E '^torch==' "$root/requirements.txt")" >&2 || return 1
    for r in "${reqs[@]}"; do
      "$venv/bin/python" -m pip install -q -r "$r" >&2 || { echo "[setup] error: pip could not install $r" >&2; return 1; }
    done
    echo "$sum" >"$stamp"
  fi
  export PATH="$venv/bin:$PATH"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  cd "$root" || return 1
}
_gpt2_ensure_env "$@"
_gpt2_status=$?
unset -f _gpt2_ensure_env
if ((_gpt2_status != 0)); then
  unset _gpt2_status
  return 1 2>/dev/null || exit 1
fi
unset _gpt2_status
