#!/usr/bin/env bash
# OpenAI-compatible API of the split client on port 8000 (GPT2_API_PORT); GPT2_TRUNK_SERVER=host:port names the
# trunk (default localhost:50051). Point an OpenAI client at http://127.0.0.1:8000/v1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
exec python -m client api "$@"
