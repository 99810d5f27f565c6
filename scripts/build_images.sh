#!/usr/bin/env bash
# Build the split system's images (deploy/Containerfile) with buildah, where no base image can be pulled.
#
#   bash scripts/build_images.sh                    trunk-cpu and client
#   bash scripts/build_images.sh trunk-cuda         on a GPU host (docs/deploy.md)
#
# GPT2_IMAGE_BASE   the base image (default: a Debian bookworm root made here with debootstrap and imported as
#                   localhost/gpt2split-debian:bookworm, once)
# GPT2_IMAGE_PREFIX the images' names: PREFIX + target (default localhost/gpt2split-)
# GPT2_TORCH_INDEX  where pip finds torch's CPU wheel (default PyTorch's index; none when this host's pip
#                   find-links hold it)
# This host's pip setup goes into the build without staying in an image: its find-links folders and file://
# indexes mounted read-only, its CA bundle (PIP_CERT) as a build secret.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { echo "[images] $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { say "needs $1 (Debian: apt-get install $2)"; exit 2; }; }
need buildah buildah
targets=("$@")
(( ${#targets[@]} )) || targets=(trunk-cpu client)
for t in "${targets[@]}"; do
  [[ $t =~ ^(trunk-cpu|trunk-cuda|client)$ ]] || { say "unknown target '$t': trunk-cpu, trunk-cuda or client"; exit 2; }
done
prefix=${GPT2_IMAGE_PREFIX:-localhost/gpt2split-}

base=${GPT2_IMAGE_BASE:-}
if [[ -z $base ]]; then
  base=localhost/gpt2split-debian:bookworm
  if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    need debootstrap debootstrap
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    say "debootstrapping Debian bookworm (minbase, python3) into $work"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/root" \
      "${GPT2_DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$work/debootstrap.log" 2>&1 \
      || { tail -5 "$work/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
    tar -C "$work/root" -c . | gzip -1 > "$work/rootfs.tar.gz"
    rm -rf "$work/root"
    printf 'FROM scratch\nADD rootfs.tar.gz /\nCMD ["/bin/bash"]\n' > "$work/Containerfile"
    buildah bud --isolation chroot -q -t "$base" -f "$work/Containerfile" "$work" >/dev/null
    say "base image $base"
  fi
fi

# this host's pip: folders of wheels and file:// indexes, mounted at the same paths; its CA bundle as a secret
pip_get() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
links=${PIP_FIND_LINKS:-$(pip_get find-links)}
extra=${PIP_EXTRA_INDEX_URL:-$(pip_get extra-index-url)}
cert=${PIP_CERT:-$(pip_get cert)}
args=(--isolation chroot --format docker --layers -f deploy/Containerfile --build-arg "BASE=$base")
keep_links=() keep_extra=()
for d in $links; do [[ -d $d ]] && { args+=(-v "$d:$d:ro"); keep_links+=("$d"); }; done
for u in $extra; do
  d=${u#file://}; d=${d%/}
  top=$d; [[ ${d##*/} == simple ]] && top=${d%/*}  # a simple index's files may lie beside it
  if [[ $u == file://* && -d $d ]]; then args+=(-v "$top:$top:ro"); keep_extra+=("$u");
  elif [[ $u != file://* ]]; then keep_extra+=("$u"); fi
done
args+=(--build-arg "PIP_FIND_LINKS=${keep_links[*]}" --build-arg "PIP_EXTRA_INDEX_URL=${keep_extra[*]}")
torch_index=${GPT2_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
for d in "${keep_links[@]}"; do compgen -G "$d/torch-*+cpu-*.whl" >/dev/null && torch_index=""; done
args+=(--build-arg "TORCH_INDEX=$torch_index")
[[ -n $cert && -f $cert ]] && args+=(--secret "id=pipcert,src=$cert")

for t in "${targets[@]}"; do
  say "building $prefix$t (from $base)"
  start=$SECONDS
  buildah bud "${args[@]}" --target "$t" -t "$prefix$t" . >&2
  say "$prefix$t built in $((SECONDS - start)) s"
done
buildah images --filter "reference=${prefix}*" >&2
