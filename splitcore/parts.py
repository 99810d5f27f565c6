"""Cut GPT-2 into bottom (embeddings + first blocks), trunk (middle blocks) and top (last blocks + head)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, GPT2Config
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.kvcache import growing_cache
from splitcore.models import ResolvedModel
from splitcore.weights import is_weight, read_tensors

DEFAULT_SPLIT = (2, 10)
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


def part_config(config: GPT2Config, attn: str) -> GPT2Config:
    """A copy of the config with the attention implementation set explicitly (unset means no causal mask)."""
    if attn not in ("sdpa", "eager"):
        raise InvalidInput(f"attention implementation must be 'sdpa' or 'eager', got '{attn}'")
    cfg = copy.deepcopy(config)
    cfg._attn_implementation = attn
    return cfg


class _Part(nn.Module):
    """Blocks of one part, renumbered 0..k-1 so each part's own KV cache starts at slot 0."""

    def __init__(self, config: GPT2Config, layers: range, state: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.layers = layers
        blocks = []
        for local, layer in enumerate(layers):
            with torch.device("meta"):
                block = GPT2Block(config, layer_idx=layer)  # real index: keeps any layer-dependent scale
            prefix = f"h.{layer}."
            block.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True, assign=True
            )
            block.attn.layer_idx = local  # cache slot inside this part
            blocks.append(block)
        self.h = nn.ModuleList(blocks)

    @property
    def n_positions(self) -> int:
        return self.config.n_positions

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_cache(self, capacity: int = 0) -> DynamicCache:
        """An empty KV cache with room for `capacity` positions (0: it grows as needed)."""
        return growing_cache(capacity)

    def _check_room(self, cache: DynamicCache, t: int) -> int:
        past = cache.get_seq_length()
        if past + t > self.n_positions:
            raise LimitExceeded(
                f"sequence of {past + t} tokens ({past} cached + {t} new) is past the model's context of "
                f"{self.n_positions} tokens"
            )
        return past

    def _run_blocks(self, h: torch.Tensor, cache: DynamicCache, past: int) -> torch.Tensor:
        if h.shape[1] == 1:
            # One new token attends to every cached position: nothing to mask. Building the (empty) mask costs
            # ~0.1 ms of cold Python per part, and a split step has three parts against the full model's one.
            mask = position_ids = None
        else:
            position_ids = torch.arange(past, past + h.shape[1], device=h.device).unsqueeze(0)
            # The mask must be built before the blocks grow the cache.
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=h,
                attention_mask=None,
                past_key_values=cache,
                position_ids=position_ids,
            )
        for block in self.h:
            h = block(h, past_key_values=cache, attention_mask=mask, use_cache=True, position_ids=position_ids)
        return h


class Bottom(_Part):
    """Token + position embeddings and blocks [0, s1): token ids in, hidden states out."""

    def __init__(self, config: GPT2Config, layers: range, state: dict[str, torch.Tensor]):
        super().__init__(config, layers, state)
        self.wte = nn.Embedding.from_pretrained(state["wte.weight"], freeze=True)
        self.wpe = nn.Embedding.from_pretrained(state["wpe.weight"], freeze=True)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InvalidInput(f"token ids must have shape [batch, seq>0], got {list(input_ids.shape)}")
        past = self._check_room(cache, input_ids.shape[1])
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        h = self.wte(input_ids) + self.wpe(positions)  # (B, T, C)
        return self._run_blocks(h, cache, past)


class Trunk(_Part):
    """Blocks [s1, s2): hidden states in, hidden states out. Runs on the server (or in-process)."""

    def check_hidden(self, h: torch.Tensor, check_finite: bool = True) -> None:
        """Reject hidden states this trunk cannot take, with a message saying what was expected.

        `check_finite=False` skips the NaN/infinity scan, for a caller that has done it already."""
        d = self.config.n_embd
        if h.ndim != 3:
            raise InvalidInput(f"hidden states have {h.ndim} dims {list(h.shape)}, expected [batch, seq, {d}]")
        if h.shape[0] < 1 or h.shape[1] < 1:
            raise InvalidInput(f"hidden states are empty: shape {list(h.shape)}, expected [batch, seq>0, {d}]")
        if h.shape[2] != d:
            raise InvalidInput(f"hidden size is {h.shape[2]}, this model's is {d} (shape {list(h.shape)})")
        if not h.is_floating_point():
            raise InvalidInput(f"hidden states must be floating point, got {h.dtype}")
        if check_finite and not bool(torch.isfinite(h).all()):
            raise InvalidInput("hidden states contain NaN or infinite values")

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Trusted input (from our own bottom); a server checks what it receives with check_hidden first."""
        past = self._check_room(cache, h.shape[1])
        return self._run_blocks(h.to(self.device, self.dtype), cache, past)

    def kv_shape(self, batch: int, seq: int) -> list[int]:
        """Shape of the stacked trunk KV cache: [blocks, 2 (key, value), batch, heads, seq, head_dim]."""
        heads = self.config.n_head
        return [len(self.h), 2, batch, heads, seq, self.config.n_embd // heads]

    @torch.inference_mode()
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
        cache = self.new_cache(past + h.shape[1])  # room for the new positions too: one copy of the KV, no regrowth
        if past:
            kv = kv.to(self.device, self.dtype)
            for i in range(len(self.h)):
                cache.update(kv[i, 0], kv[i, 1], i)
        self._check_room(cache, h.shape[1])
        out = self._run_blocks(h.to(self.device, self.dtype), cache, past)
        new = torch.stack([torch.stack([layer.keys[:, :, past:], layer.values[:, :, past:]]) for layer in cache.layers])
        return out, new


class Top(_Part):
    """Blocks [s2, n), final layer norm and LM head: hidden states in, logits of the last position out."""

    def __init__(self, config: GPT2Config, layers: range, state: dict[str, torch.Tensor]):
        super().__init__(config, layers, state)
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.ln_f.load_state_dict({"weight": state["ln_f.weight"], "bias": state["ln_f.bias"]}, assign=True)
        head = state.get("lm_head.weight", state.get("wte.weight"))  # GPT-2 ties the head to wte
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        return self.head(self.blocks(h, cache))

    @torch.inference_mode()
    def blocks(self, h: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """The top's blocks alone: hidden states of every new position."""
        past = self._check_room(cache, h.shape[1])
        return self._run_blocks(h.to(self.device, self.dtype), cache, past)

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final layer norm and LM head on the last position: (B, vocab)."""
        return self.lm_head(self.ln_f(h[:, -1:, :]))[:, -1, :]  # the head only where it's needed


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


def load_parts(
    model: ResolvedModel,
    split: Split | str | tuple[int, int],
    parts: Iterable[str] = PART_NAMES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
) -> dict[str, _Part]:
    """Build the requested parts, reading only their weights from the checkpoint. All parts in eval()."""
    parts = tuple(parts)
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise InvalidInput(f"unknown part(s) {sorted(unknown)}; parts are {PART_NAMES}")
    n_layer = model.config.n_layer
    split = Split.parse(split, n_layer)
    config = part_config(model.config, attn)
    state = read_tensors(model.path, _wanted_keys(parts, split, n_layer))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}  # wte shared by bottom and top
    return {p: _PART_CLASSES[p](config, split.layers(p, n_layer), state).eval() for p in parts}
