"""Cut GPT-2 into bottom (embeddings + first blocks), trunk (middle blocks) and top (last blocks + head), and
load the full model alike: every one of them is a splitcore.gpt2.GPT2 over its run of blocks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.gpt2 import GPT2, GPT2Config, from_state
from splitcore.kvcache import KVCache
from splitcore.models import ResolvedModel
from splitcore.weights import is_weight, read_tensors

PART_NAMES = ("bottom", "trunk", "top")


@dataclass(frozen=True)
class Split:
    """Split points: bottom runs blocks [0, s1), trunk [s1, s2), top [s2, n_layer)."""

    s1: int
    s2: int

    def __str__(self) -> str:
        return f"{self.s1},{self.s2}"

    @classmethod
    def parse(cls, text: str | tuple[int, int] | Split, n_layer: int) -> Split:
        """Parse 's1,s2' and check 0 < s1 < s2 < n_layer, with a message naming the valid range."""
        if isinstance(text, Split):
            s1, s2 = text.s1, text.s2
        elif isinstance(text, tuple):
            s1, s2 = text
        else:
            parts = str(text).replace(" ", "").split(",")
            try:
                s1, s2 = (int(p) for p in parts)
            except ValueError:
                raise InvalidInput(f"split points must be two integers 's1,s2' (e.g. 2,10), got '{text}'") from None
        if not 0 < s1 < s2 < n_layer:
            raise InvalidInput(
                f"split points {s1},{s2} are out of range: need 0 < s1 < s2 < {n_layer} "
                f"(this model has {n_layer} layers, so s1 in 1..{n_layer - 2}, s2 in s1+1..{n_layer - 1})"
            )
        return cls(s1, s2)

    def layers(self, part: str, n_layer: int) -> range:
        return {"bottom": range(0, self.s1), "trunk": range(self.s1, self.s2), "top": range(self.s2, n_layer)}[part]


class Bottom(GPT2):
    """Token + position embeddings and blocks [0, s1): token ids in, hidden states out."""


class Trunk(GPT2):
    """Blocks [s1, s2): hidden states in, hidden states out. Runs on the server (or in-process)."""

    def check_hidden(self, h: torch.Tensor, check_finite: bool = True) -> None:
        """Reject hidden states this trunk cannot take, with a message saying what was expected.

        `check_finite=False` skips the NaN/infinity scan, for a caller that has done it already."""
        self.check_hidden_shape(tuple(h.shape), h.is_floating_point(), h.dtype)
        if check_finite and not bool(torch.isfinite(h).all()):
            raise InvalidInput("hidden states contain NaN or infinite values")

    def check_hidden_shape(self, shape: tuple[int, ...], floating: bool, dtype: object) -> None:
        """check_hidden's checks of shape and kind, for hidden states that are not (yet) a tensor."""
        d = self.config.n_embd
        if len(shape) != 3:
            raise InvalidInput(f"hidden states have {len(shape)} dims {list(shape)}, expected [batch, seq, {d}]")
        if shape[0] < 1 or shape[1] < 1:
            raise InvalidInput(f"hidden states are empty: shape {list(shape)}, expected [batch, seq>0, {d}]")
        if shape[2] != d:
            raise InvalidInput(f"hidden size is {shape[2]}, this model's is {d} (shape {list(shape)})")
        if not floating:
            raise InvalidInput(f"hidden states must be floating point, got {dtype}")

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, row: int | None = None, **kw) -> torch.Tensor:
        """Trusted input (from our own bottom); a server checks what it receives with check_hidden first."""
        return super().forward(h.to(self.device, self.dtype), cache, row, **kw)

    def kv_shape(self, batch: int, seq: int) -> list[int]:
        """Shape of the stacked trunk KV cache: [blocks, 2 (key, value), batch, heads, seq, head_dim]."""
        return [len(self.h), 2, batch, self.config.n_head, seq, self.config.head_dim]

    def forward_stateless(
        self, h: torch.Tensor, kv: torch.Tensor | None, check_finite: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run with a client-held cache: returns hidden states and the KV entries of the new positions only.

        `check_finite=False`: the caller has already rejected NaN/infinite values (the server, while decoding)."""
        self.check_hidden(h, check_finite)
        past = 0
        if kv is not None and kv.numel() > 0:
            want = self.kv_shape(h.shape[0], kv.shape[4] if kv.ndim == 6 else -1)
            if list(kv.shape) != want:
                raise InvalidInput(f"trunk KV cache has shape {list(kv.shape)}, expected {want}")
            if check_finite and not bool(torch.isfinite(kv).all()):
                raise InvalidInput("trunk KV cache contains NaN or infinite values")
            past = kv.shape[4]
        if past + h.shape[1] > self.n_positions:
            raise LimitExceeded(
                f"sequence of {past + h.shape[1]} tokens ({past} cached + {h.shape[1]} new) is past the model's "
                f"context of {self.n_positions} tokens"
            )
        # room for the new positions too: one copy of the client's KV, no regrowth
        cache = self.new_cache(past + h.shape[1], rows=h.shape[0])
        if past:
            kv = kv.to(self.device, self.dtype)
            for i in range(len(self.h)):
                cache.k[i][:, :, :past] = kv[i, 0]
                cache.v[i][:, :, :past] = kv[i, 1]
            cache.lengths = [past] * h.shape[0]
        out = self(h, cache)
        new = [torch.stack([k[:, :, past:], v[:, :, past:]]) for k, v in zip(cache.k, cache.v, strict=True)]
        return out, torch.stack(new)


class Top(GPT2):
    """Blocks [s2, n), final layer norm and LM head: hidden states in, logits of the last position out."""

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, row: int | None = None, **kw) -> torch.Tensor:
        return super().forward(h.to(self.device, self.dtype), cache, row, **kw)

    def blocks(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The top's blocks alone: hidden states of every new position."""
        return self.hidden(h.to(self.device, self.dtype), cache)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final layer norm and LM head on the last position: (B, vocab)."""
        return self.logits(h)


_PART_CLASSES = {"bottom": Bottom, "trunk": Trunk, "top": Top}


def _wanted_keys(parts: Iterable[str], split: Split, n_layer: int):
    layer_ids = {i for p in parts for i in split.layers(p, n_layer)}
    extra = set()
    if "bottom" in parts:
        extra |= {"wte.weight", "wpe.weight"}
    if "top" in parts:
        extra |= {"ln_f.weight", "ln_f.bias", "lm_head.weight", "wte.weight"}

    def keep(key: str) -> bool:
        if key in extra:
            return True
        if key.startswith("h."):
            return int(key.split(".")[1]) in layer_ids and is_weight(key)
        return False

    return keep


def _read_state(model: ResolvedModel, keep, device, dtype) -> dict[str, torch.Tensor]:
    state = read_tensors(model.path, keep)
    return {k: v.to(device=device, dtype=dtype) for k, v in state.items()}  # wte shared by bottom and top


def load_parts(
    model: ResolvedModel,
    split: Split | str | tuple[int, int],
    parts: Iterable[str] = PART_NAMES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
) -> dict[str, GPT2]:
    """Build the requested parts, reading only their weights from the checkpoint. All parts in eval()."""
    parts = tuple(parts)
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise InvalidInput(f"unknown part(s) {sorted(unknown)}; parts are {PART_NAMES}")
    n_layer = model.config.n_layer
    split = Split.parse(split, n_layer)
    cfg = GPT2Config.from_hf(model.config)
    state = _read_state(model, _wanted_keys(parts, split, n_layer), device, dtype)
    out = {}
    for p in parts:
        out[p] = from_state(cfg, state, split.layers(p, n_layer), p == "bottom", p == "top", attn, _PART_CLASSES[p])
    return out


def load_full(
    model: ResolvedModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa"
) -> GPT2:
    """The whole model, unsplit, on the same code as the parts (in eval mode)."""
    state = _read_state(model, is_weight, device, dtype)
    return from_state(GPT2Config.from_hf(model.config), state, range(model.config.n_layer), True, True, attn)
