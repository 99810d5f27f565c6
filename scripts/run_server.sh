#!/usr/bin/env bash
# Trunk server on 0.0.0.0:50051 (flags: python -m server --help). Falls back to random:gpt2 if gpt2 can't be had.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
exec python -m server "$@"
