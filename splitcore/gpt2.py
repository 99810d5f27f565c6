"""GPT-2 in one file: config, attention over an explicit KV cache, MLP, block, and a model that holds any run
of blocks [first, last) with the embeddings (first == 0) and/or the final norm and LM head (last == n_layer).

The full model and the split parts (bottom, trunk, top) are all this one class, so a split computes exactly
what the full model computes. Module names are Hugging Face's (`wte`, `wpe`, `h.3.attn.c_attn`, `ln_f`,
`lm_head`), blocks keep their global index, and HF-format checkpoints load by tensor name (HF's Conv1D weights
are [in, out]; here they are nn.Linear's [out, in]). HF's GPT2LMHeadModel is the reference in the tests.

Two ways to run the blocks:
- `forward` (eager): any number of new positions, rows at the same or at different positions, with or without
  a cache (without one it is a plain causal forward that trains under autograd);
- `decode_static`: one new position per row with shapes fixed by the cache's capacity and no host values, so
  that a CUDA graph can capture it (splitcore/cudagraph.py). It runs on the CPU too, where the tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitcore.errors import InvalidInput, ModelSpecError
from splitcore.kvcache import KVCache

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # the context
    vocab_size: int = 50257
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer index + 1)
    embd_pdrop: float = 0.1  # dropout probabilities, used only in training mode
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf) -> GPT2Config:
        """From a transformers GPT2Config (or anything with its attribute names)."""
        act = getattr(hf, "activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise ModelSpecError(f"activation '{act}' is not supported; supported: {', '.join(_ACTIVATIONS)}")
        if hf.n_embd % hf.n_head:
            raise ModelSpecError(f"width {hf.n_embd} is not a multiple of {hf.n_head} heads")
        return cls(
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=hf.n_embd,
            n_positions=hf.n_positions,
            vocab_size=hf.vocab_size,
            n_inner=getattr(hf, "n_inner", None),
            activation=act,
            layer_norm_epsilon=hf.layer_norm_epsilon,
            scale_attn_weights=getattr(hf, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=getattr(hf, "scale_attn_by_inverse_layer_idx", False),
            embd_pdrop=getattr(hf, "embd_pdrop", 0.1),
            attn_pdrop=getattr(hf, "attn_pdrop", 0.1),
            resid_pdrop=getattr(hf, "resid_pdrop", 0.1),
        )


@dataclass
class StepPlan:
    """What every block of one forward needs to know about the cache; built once per forward (not a wire `Step`)."""

    cache: KVCache | None
    row: int | None  # the one cache row taking part (None: every row)
    start: int | None  # where the new positions start when every row is at the same place, else None
    positions: torch.Tensor | None  # (B, T) the new positions of each row, when rows are at different places
    end: int  # keys the attention reads: positions [0, end)
    mask: torch.Tensor | None  # bool, True = attend: (T, end) or (B, 1, T, end); None with `causal` or one token
    causal: bool  # the keys are exactly the new positions: a plain causal mask


def _attend(q, k, v, mask, causal: bool, scale: float, impl: str, dropout: float) -> torch.Tensor:
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale)
    att = (q @ k.transpose(-2, -1)) * scale  # eager: (B, heads, T, L)
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(torch.softmax(att, dim=-1), dropout) if dropout else torch.softmax(att, dim=-1)
    return att @ v


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, impl: str):
        super().__init__()
        self.n_head, self.head_dim, self.impl = cfg.n_head, cfg.head_dim, impl
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.scale = (1 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0) / (
            layer_idx + 1 if cfg.scale_attn_by_inverse_layer_idx else 1
        )
        self.attn_pdrop, self.resid_pdrop = cfg.attn_pdrop, cfg.resid_pdrop

    def _qkv(self, x: torch.Tensor):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        return [y.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for y in (q, k, v)]  # (B, heads, T, hd)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        y = self.c_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)
        return F.dropout(y, self.resid_pdrop) if self.training and self.resid_pdrop else y

    def forward(self, x: torch.Tensor, step: StepPlan, kv_index: int) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if step.cache is not None:
            k, v = step.cache.write(kv_index, k, v, step.row, step.start, step.positions, step.end)
        dropout = self.attn_pdrop if self.training else 0.0
        return self._out(_attend(q, k, v, step.mask, step.causal, self.scale, self.impl, dropout))

    def forward_static(self, x: torch.Tensor, cache: KVCache, kv_index: int, positions, mask) -> torch.Tensor:
        q, k, v = self._qkv(x)
        k, v = cache.write_static(kv_index, k, v, positions)
        end = mask.shape[-1]
        return self._out(_attend(q, k[:, :, :end], v[:, :, :end], mask, False, self.scale, self.impl, 0.0))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc, self.c_proj = nn.Linear(cfg.n_embd, inner), nn.Linear(inner, cfg.n_embd)
        self.act, self.resid_pdrop = _ACTIVATIONS[cfg.activation], cfg.resid_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.act(self.c_fc(x)))
        return F.dropout(y, self.resid_pdrop) if self.training and self.resid_pdrop else y


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer_idx, impl)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, step: StepPlan, kv_index: int) -> torch.Tensor:
        """`kv_index`: this block's place in the part's cache (0 for its first block), not its global layer."""
        x = x + self.attn(self.ln_1(x), step, kv_index)
        return x + self.mlp(self.ln_2(x))

    def forward_static(self, x, cache: KVCache, kv_index: int, positions, mask) -> torch.Tensor:
        x = x + self.attn.forward_static(self.ln_1(x), cache, kv_index, positions, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Blocks `layers` of GPT-2, with the token and position embeddings (`embed`) and/or the final layer norm
    and LM head (`head`). Input: token ids (B, T) with `embed`, else hidden states (B, T, C). Output: logits
    with `head`, else hidden states (B, T, C)."""

    def __init__(self, cfg: GPT2Config, layers: range, embed: bool, head: bool, attn: str = "sdpa"):
        super().__init__()
        if attn not in ("sdpa", "eager"):
            raise InvalidInput(f"attention implementation must be 'sdpa' or 'eager', got '{attn}'")
        self.config, self.layers, self.has_embed, self.has_head, self.attn_impl = cfg, layers, embed, head, attn
        if embed:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleDict({str(i): Block(cfg, i, attn) for i in layers})  # global names: h.2, h.3, ...
        if head:
            self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            if embed:
                self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self._where: tuple[torch.device, torch.dtype] | None = None  # of the parameters, looked up once

    @property
    def n_positions(self) -> int:
        return self.config.n_positions

    @property
    def device(self) -> torch.device:
        return self._placement()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._placement()[1]

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        if self._where is None:
            p = next(self.parameters())
            self._where = (p.device, p.dtype)
        return self._where

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: look the placement up again
        self._where = None
        return super()._apply(fn, recurse)

    def cache_bytes(self, capacity: int, rows: int = 1) -> int:
        """What new_cache(capacity, rows) allocates: keys and values of every block."""
        c = self.config
        return 2 * len(self.h) * rows * c.n_embd * capacity * torch.empty((), dtype=self.dtype).element_size()

    def new_cache(self, capacity: int = 0, rows: int = 1, static: bool = False) -> KVCache:
        """An empty cache for this model's blocks: room for `capacity` positions (0: grows from a minimum);
        `static` fixes the room (CUDA graphs need buffers that never move)."""
        c = self.config
        return KVCache(
            len(self.h), rows, c.n_head, c.head_dim, capacity, self.device, self.dtype, not static, c.n_positions
        )

    # --- eager ---------------------------------------------------------------------------------------
    def _step(self, cache: KVCache | None, row: int | None, t: int, device: torch.device) -> StepPlan:
        if cache is None:
            return StepPlan(None, None, 0, None, t, None, True)
        past, end = cache.start(row, t)
        if len(set(past)) == 1:
            p = past[0]
            if t == 1:  # one new token attends to everything cached: no mask to build
                return StepPlan(cache, row, p, None, end, None, False)
            if p == 0:
                return StepPlan(cache, row, p, None, end, None, True)
            q = torch.arange(p, p + t, device=device)
            return StepPlan(cache, row, p, None, end, torch.arange(end, device=device) <= q[:, None], False)  # (T, L)
        q = torch.tensor(past, device=device)[:, None] + torch.arange(t, device=device)  # (B, T) query positions
        mask = torch.arange(end, device=device) <= q[:, :, None]  # (B, T, L)
        return StepPlan(cache, row, None, q, end, mask.unsqueeze(1), False)

    def _embed(self, ids: torch.Tensor, step: StepPlan) -> torch.Tensor:
        t = ids.shape[1]
        pos = step.positions if step.start is None else torch.arange(step.start, step.start + t, device=ids.device)
        h = self.wte(ids) + self.wpe(pos)  # (B, T, C)
        return F.dropout(h, self.config.embd_pdrop) if self.training and self.config.embd_pdrop else h

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None, row: int | None = None) -> torch.Tensor:
        """Embeddings (if any) and blocks: hidden states (B, T, C) of every new position. With a cache the new
        positions follow each row's cached ones; `row` picks one row of a multi-row cache."""
        if self.has_embed and (x.ndim != 2 or x.shape[1] == 0):
            raise InvalidInput(f"token ids must have shape [batch, seq>0], got {list(x.shape)}")
        if cache is None and x.shape[1] > self.n_positions:
            raise InvalidInput(f"sequence of {x.shape[1]} tokens is past the model's context of {self.n_positions}")
        step = self._step(cache, row, x.shape[1], x.device)
        h = self._embed(x, step) if self.has_embed else x
        for kv_index, block in enumerate(self.h.values()):
            h = block(h, step, kv_index)
        if cache is not None:
            cache.advance(row, x.shape[1])
        return h

    def logits(self, h: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Final norm and LM head: (B, vocab) for the last position, or (B, T, vocab) for all of them."""
        if not all_positions:
            return self.lm_head(self.ln_f(h[:, -1, :]))  # the head only where it's needed
        return self.lm_head(self.ln_f(h))

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, row: int | None = None, all_positions: bool = False
    ) -> torch.Tensor:
        h = self.hidden(x, cache, row)
        return self.logits(h, all_positions) if self.has_head else h

    # --- static shapes -------------------------------------------------------------------------------
    def decode_static(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new position for every row of `cache`, at the positions held on the device; shapes depend only
        on the cache's rows and capacity, and nothing is read back to the host, so a CUDA graph can capture it.
        Input (rows, 1) ids or (rows, 1, C) hidden states; output (rows, vocab) logits or (rows, 1, C)."""
        out = self.decode_rows(x, cache, cache.positions)  # (B,) filled positions = where the new one goes
        cache.positions.add_(1)
        return out

    def decode_rows(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, end: int = 0) -> torch.Tensor:
        """One new position for each of the first N = len(x) rows of `cache`, written at `positions` (N,) and
        attending to keys [0, positions[r]] among the first `end` (0: the whole room). The cache's lengths are
        the caller's to advance. With `end` = 0 the shapes depend only on N and the room, and nothing is read
        back to the host: capturable. The trunk server batches the decode steps of its sessions this way, a
        session per row, rows that sit out a step writing where nothing is read."""
        n, end = x.shape[0], end or cache.capacity
        keys = torch.arange(end, device=positions.device)
        mask = (keys <= positions[:, None]).view(n, 1, 1, end)  # (N, 1, 1, end)
        h = self.wte(x) + self.wpe(positions)[:, None, :] if self.has_embed else x
        for kv_index, block in enumerate(self.h.values()):
            h = block.forward_static(h, cache, kv_index, positions, mask)
        return self.logits(h) if self.has_head else h


# --- loading ------------------------------------------------------------------------------------------------
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_state(
    cfg: GPT2Config,
    state: dict[str, torch.Tensor],
    layers: range,
    embed: bool,
    head: bool,
    attn: str = "sdpa",
    cls: type[GPT2] = GPT2,
) -> GPT2:
    """A model of class `cls` (in eval mode, frozen) holding `layers`, built from a checkpoint's tensors by HF
    name ('h.3.mlp.c_fc.weight', 'wte.weight'...; wrapper prefixes already stripped). Tensors are used as
    given, not copied, except that HF's Conv1D weights are transposed; the LM head is the checkpoint's
    `lm_head.weight`, else the tied `wte.weight`."""
    with torch.device("meta"):
        model = cls(cfg, layers, embed, head, attn)
    wanted = {}
    for name in model.state_dict():
        key = name
        if name == "lm_head.weight" and "lm_head.weight" not in state:
            key = "wte.weight"
        if key not in state:
            raise ModelSpecError(f"the checkpoint has no tensor '{key}'")
        t = state[key]
        wanted[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    model.load_state_dict(wanted, strict=True, assign=True)
    if head and embed:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the tied parameter: tie it again
    return model.requires_grad_(False).eval()  # inference by default; a trainer turns on what it trains


def to_state(model: GPT2) -> dict[str, torch.Tensor]:
    """The inverse of from_state: the model's tensors by HF name, Conv1D weights back to [in, out]; no lm_head
    when it is tied to wte (GPT-2 saves it once)."""
    return {
        name: hf_layout(name, t)
        for name, t in model.state_dict().items()
        if not (name == "lm_head.weight" and model.has_embed)
    }


def hf_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """A copy of the model's tensor `name` as HF's GPT-2 stores it: Conv1D weights back to [in, out]."""
    t = t.detach()
    return t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t.clone()


def with_weights(model: GPT2, state: dict[str, torch.Tensor]) -> GPT2:
    """A copy of `model` (same class, blocks, device and dtype; frozen) whose tensors named in `state` (by HF
    name, as to_state writes them) are replaced and the rest copied. A part with a head and no embeddings takes
    `wte.weight` as its head, as GPT-2 ties them."""
    merged = to_state(model)
    for name, t in state.items():
        if name in merged:
            merged[name] = t.to(model.device, model.dtype)
    if "wte.weight" in state and "lm_head.weight" in merged:
        merged["lm_head.weight"] = state["wte.weight"].to(model.device, model.dtype)
    return from_state(model.config, merged, model.layers, model.has_embed, model.has_head, model.attn_impl, type(model))
