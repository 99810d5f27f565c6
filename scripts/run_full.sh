#!/usr/bin/env bash
# Full-model baseline app on port 7861.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
export GPT2_FALLBACK_RANDOM="${GPT2_FALLBACK_RANDOM:-1}"
exec python -m baseline serve "$@"
