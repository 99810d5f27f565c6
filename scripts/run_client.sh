#!/usr/bin/env bash
# Split client app on port 7860; GPT2_TRUNK_SERVER=host:port names the trunk (default localhost:50051).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
exec python -m client serve "$@"
