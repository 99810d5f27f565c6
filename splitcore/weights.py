"""Read selected tensors of a GPT-2 checkpoint without loading the rest, and digest all of them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from splitcore.errors import ModelSpecError

_PREFIXES = ("transformer.",)  # GPT2LMHeadModel saves "transformer.h.0...", hub GPT-2 saves "h.0..."


def canonical(key: str) -> str:
    """Checkpoint key without the wrapper prefix: 'transformer.h.3.ln_1.weight' -> 'h.3.ln_1.weight'."""
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _iter_tensors(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    st = path / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            for key in sorted(f.keys(), key=canonical):
                if keep(canonical(key)):
                    yield canonical(key), f.get_tensor(key)
        return
    pt = path / "pytorch_model.bin"
    if pt.exists():  # mmap: only the tensors we touch are paged in
        state = torch.load(str(pt), map_location="cpu", weights_only=True, mmap=True)
        for key, t in sorted(state.items(), key=lambda kv: canonical(kv[0])):
            if keep(canonical(key)):
                yield canonical(key), t
        return
    raise ModelSpecError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")


def read_tensors(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose canonical key passes `keep`, and no others."""
    return dict(_iter_tensors(path, keep))


def is_weight(key: str) -> bool:
    """False for the attention-mask buffers old checkpoints carry ('h.0.attn.bias', 'h.0.attn.masked_bias')."""
    return key.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])


def weights_digest(path: Path) -> str:
    """A hash of every weight tensor (name, dtype, shape, bytes) as stored; the same on every machine."""
    h = hashlib.blake2b(digest_size=16)
    for key, t in _iter_tensors(path, is_weight):  # sorted by canonical key, one tensor at a time
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
