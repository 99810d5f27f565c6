#!/usr/bin/env bash
# Run the whole test suite (lint, stub check, unit, gRPC and browser tests) on a machine with nothing set up.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh" dev
# The browser tests drive Debian's chromium (no browser download); the trained:kjv preset reads the King James
# Bible from Debian's bible-kjv; the replica tests put Debian's nginx in front of trunk servers (deploy/nginx.conf);
# the image tests need buildah, debootstrap and podman.
# Install them when we can.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v bible >/dev/null 2>&1 || missing+=(bible-kjv)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
# the image tests build deploy/Containerfile with buildah from a debootstrapped Debian; podman-compose needs podman
for tool in buildah debootstrap podman; do command -v $tool >/dev/null 2>&1 || missing+=($tool); done
if (( ${#missing[@]} )) && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing ${missing[*]} (apt-get)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 \
    || echo "[test] could not install ${missing[*]}: their tests will skip (or fail under CI)" >&2
fi
echo "[test] ruff" >&2
ruff check . && ruff format --check -q .
echo "[test] docs (mkdocs build --strict)" >&2
NO_MKDOCS_2_WARNING=1 mkdocs build --strict -q --site-dir "$(mktemp -d)"
echo "[test] pytest" >&2
python -m pytest "$@"
