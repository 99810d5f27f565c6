"""Compression of a model part at load: magnitude pruning (`prune:P`), 2:4 semi-structured sparsity (`prune24`) and
int8 weights (`int8`). The trunk server applies `--compress` to its blocks, the client to its bottom, top and
drafts, the baseline to the whole model; the fingerprint carries the trunk's, so both sides agree on it.

Pruning zeroes weights in place and stores them dense, so a pruned part loads and runs anywhere (and is no
faster: unstructured zeros in a dense matrix skip no work). On CUDA, a 2:4 part is stored semi-structured, the one
sparse pattern kernels speed up. int8 is torch's own dynamic quantisation of `nn.Linear` on the CPU (int8
weights with a scale per output channel, activations quantised per call) and torchao's weight-only int8 on CUDA.
Only the blocks' linear weights are compressed: the LM head is the token embedding (GPT-2 ties them), which the
bottom needs whole, and an int8 copy of it would add memory rather than save it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2

logger = logging.getLogger(__name__)

METHODS = ("none", "prune:P", "prune24", "int8")
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class Compression:
    """One compression setting: `method` none, prune, prune24 or int8; `amount` the fraction pruned (prune)."""

    method: str = "none"
    amount: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> Compression:
        """'none' (or ''), 'prune:P' with 0 <= P < 1, 'prune24' or 'int8'; anything else is one readable line."""
        text = (spec or "none").strip().lower()
        if text in ("none", "prune24", "int8"):
            return cls(text)
        name, sep, value = text.partition(":")
        if name == "prune" and sep:
            try:
                amount = float(value)
            except ValueError:
                amount = -1.0
            if 0 <= amount < 1:
                return cls("prune", amount)
            raise InvalidInput(f"--compress {spec}: the pruned fraction P of prune:P must be in [0, 1), got '{value}'")
        raise InvalidInput(f"--compress {spec}: unknown compression; use one of {', '.join(METHODS)}")

    @property
    def active(self) -> bool:
        return self.method != "none" and not (self.method == "prune" and self.amount == 0)

    def graphs_with(self, graphs: bool) -> bool:
        """Whether CUDA graphs stay on: dense weights (none, prune) capture as always; int8's and 2:4's CUDA kernels
        have not been captured in this project's tests, so they run eagerly (a log line says so)."""
        if graphs and self.method in ("int8", "prune24"):
            logger.warning("CUDA graphs off: --compress %s runs its CUDA kernels eagerly", self)
            return False
        return graphs

    def __str__(self) -> str:
        """The canonical name, the fingerprint's: 'none' for anything that leaves the weights as they are."""
        if not self.active:
            return "none"
        return f"prune:{self.amount:g}" if self.method == "prune" else self.method

    def apply(self, model: GPT2, layers: Iterable[int] | None = None) -> GPT2:
        """Compress `model` (a splitcore.gpt2.GPT2, in place) and return it: the linear weights of its blocks (of
        `layers` only, if given)."""
        if self.method == "none":
            return model
        linears = _block_linears(model, layers)
        with torch.no_grad():
            if self.method == "prune":
                for m in linears.values():
                    m.weight.copy_(prune_smallest(m.weight, self.amount))
            elif self.method == "prune24":
                for m in linears.values():
                    m.weight.copy_(prune_2_4(m.weight))
                if model.device.type == "cuda":
                    _to_semi_structured(linears)
            else:
                _int8(model, linears)
                model.int8 = True  # PEFT cannot wrap these modules: see check_adaptable
        logger.info("compressed %d linear weights: %s", len(linears), self)
        return model


def prune_smallest(w: torch.Tensor, amount: float) -> torch.Tensor:
    """`w` with its round(amount x numel) smallest-magnitude entries zeroed (torch.nn.utils.prune's L1
    unstructured rule: the same count, the same order of magnitudes)."""
    k = round(amount * w.numel())
    if k == 0:
        return w.clone()
    drop = torch.topk(w.detach().abs().flatten(), k, largest=False).indices
    out = w.detach().clone().flatten()
    out[drop] = 0
    return out.view_as(w)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """`w` (out, in) with the two smaller-magnitude entries of every group of 4 consecutive inputs zeroed."""
    if w.shape[-1] % 4:
        raise InvalidInput(f"2:4 sparsity needs an input width that is a multiple of 4, got {w.shape[-1]}")
    groups = w.detach().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).view_as(w)


def _block_linears(model: nn.Module, layers: Iterable[int] | None) -> dict[str, nn.Module]:
    wanted = None if layers is None else {str(i) for i in layers}
    out = {}
    for i, block in getattr(model, "h", {}).items():
        if wanted is None or i in wanted:
            for kind in BLOCK_LINEARS:
                out[f"h.{i}.{kind}"] = block.get_submodule(kind)
    return out


def _to_semi_structured(linears: dict[str, nn.Module]) -> None:
    """CUDA: store each 2:4 weight semi-structured, so that the sparse kernels skip the zeros (half precision, on a
    GPU that has them); where that fails, the weight stays dense and a log line says why."""
    from torch.sparse import to_sparse_semi_structured

    for name, m in linears.items():
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            logger.warning("2:4 weights stay dense (%s: %s); they compute as the dense model does", name, e)
            return


def _int8(model: GPT2, linears: dict[str, nn.Module]) -> None:
    device, dtype = model.device, model.dtype
    if device.type == "cuda":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise InvalidInput("--compress int8 on CUDA uses torchao: pip install torchao") from None
        chosen = set(linears.values())
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _name: m in chosen)
        return
    if dtype != torch.float32:
        raise InvalidInput(
            f"--compress int8 on the CPU quantises float32 weights; this part is {dtype} (use --dtype float32)"
        )
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    for name, m in linears.items():
        m.qconfig = per_channel_dynamic_qconfig
        parent, _, child = name.rpartition(".")
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated in favour of torchao's
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            setattr(model.get_submodule(parent), child, RowwiseInt8(DynamicLinear.from_float(m)))
    model._where = None  # the placement is looked up again from what is left


class RowwiseInt8(nn.Module):
    """torch's dynamically quantised Linear, called once per row of a batch. It quantises its input with one scale
    per call, so a batch's rows would change each other's results: row by row, a session's tokens are the same
    batched as alone (the server batches sessions' decode steps; a row is one session)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[0] == 1:
            return self.linear(x)
        return torch.cat([self.linear(row) for row in x.split(1)])


def check_adaptable(model: nn.Module) -> None:
    """Refuse, in one line, an adapter or training on an int8 part (PEFT cannot wrap its modules)."""
    if getattr(model, "int8", False):
        raise InvalidInput(
            "this part is int8-quantised (--compress int8): LoRA adapters and training need float weights; "
            "use --compress none, prune:P or prune24 there"
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights `model` holds in memory, each tensor counted once (tied ones too): int8 modules by their
    int8 weights, scales and biases; sparse semi-structured weights by what they store."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    seen, total = set(), 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        key = (t.data_ptr(), t.numel(), t.dtype) if t.layout == torch.strided else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size() if t.layout == torch.strided else _sparse_bytes(t)

    for m in model.modules():
        if isinstance(m, DynamicLinear):
            w = m.weight()
            count(w.int_repr())
            if w.qscheme() == torch.per_channel_affine:  # (per tensor: one scale, nothing to count)
                count(w.q_per_channel_scales())
            if m.bias() is not None:
                count(m.bias())
    for t in [*model.parameters(), *model.buffers()]:
        count(t)
    return total


def _sparse_bytes(t: torch.Tensor) -> int:
    return sum(
        x.numel() * x.element_size() for x in (getattr(t, "packed", None), getattr(t, "meta", None)) if x is not None
    )
