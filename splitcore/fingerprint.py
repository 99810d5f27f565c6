"""A short hash of what both sides of a split must agree on: architecture, split points and weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from splitcore.compress import Compression
from splitcore.models import ResolvedModel
from splitcore.parts import Split
from splitcore.weights import weights_digest

# Config fields that change what the blocks compute. Names and paths are left out on purpose: the same
# weights reached as "gpt2" on one side and "./models/gpt2" on the other are the same model.
_ARCH_FIELDS = (
    "n_layer",
    "n_embd",
    "n_head",
    "n_positions",
    "vocab_size",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)


@dataclass(frozen=True)
class Fingerprint:
    """The parts of a model identity, so a mismatch can say exactly what differs."""

    arch: str  # hash of the architecture fields
    split: str  # "s1,s2"
    weights: str  # digest of every weight tensor as stored
    n_layer: int
    n_embd: int
    adapter: str = ""  # digest of a LoRA adapter the model runs with; "" = none
    compression: str = ""  # what the trunk does to its weights at load (splitcore/compress.py); "" = none

    @property
    def digest(self) -> str:
        text = f"{self.arch}|{self.split}|{self.weights}" + (f"|{self.adapter}" if self.adapter else "")
        text += f"|compress={self.compression}" if self.compression else ""
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def with_adapter(self, adapter: str) -> Fingerprint:
        return dataclasses.replace(self, adapter=adapter)

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable list of what differs ('' when nothing does)."""
        out = []
        if (self.n_layer, self.n_embd) != (other.n_layer, other.n_embd):
            out.append(
                f"model shape ({self.n_layer} layers, width {self.n_embd} vs "
                f"{other.n_layer} layers, width {other.n_embd})"
            )
        elif self.arch != other.arch:
            out.append("model configuration")
        if self.split != other.split:
            out.append(f"split points ({self.split} vs {other.split})")
        if self.weights != other.weights:
            out.append(f"weights (digest {self.weights[:12]} vs {other.weights[:12]})")
        if self.adapter != other.adapter:
            out.append(f"adapter (digest {self.adapter[:12] or 'none'} vs {other.adapter[:12] or 'none'})")
        if self.compression != other.compression:
            out.append(f"the trunk's compression ({self.compression or 'none'} vs {other.compression or 'none'})")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=16)
def _digest_cached(path: Path, mtime_ns: int, size: int) -> str:
    return weights_digest(path)


def model_fingerprint(model: ResolvedModel, split: Split, compression: Compression | None = None) -> Fingerprint:
    """What both sides agree on; `compression`: the trunk's (the client's own parts are its business)."""
    cfg = model.config.to_dict()
    arch = json.dumps({k: cfg.get(k) for k in _ARCH_FIELDS}, sort_keys=True)
    weights_file = next(f for f in (model.path / "model.safetensors", model.path / "pytorch_model.bin") if f.exists())
    st = weights_file.stat()
    return Fingerprint(
        arch=hashlib.blake2b(arch.encode(), digest_size=8).hexdigest(),
        split=str(split),
        weights=_digest_cached(model.path, st.st_mtime_ns, st.st_size),
        n_layer=model.config.n_layer,
        n_embd=model.config.n_embd,
        compression=str(compression) if compression is not None and compression.active else "",
    )
