"""LoRA adapters on the core's blocks (through PEFT), their optimizer, and PEFT's file format.

Used by the trunk server (one adapter per training session, on a twin of the trunk that shares its frozen
weights), by the client's `train` command (the same on its own parts, and the local reference), and by the
apps that generate with an adapter. Module names are HF's (`h.3.attn.c_attn`), so an exported adapter loads
with `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), dir)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from splitcore.compress import check_adaptable
from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2, with_weights

MODULE_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
MAX_RANK = 256
HF_PREFIX = "base_model.model.transformer."  # where GPT2LMHeadModel's blocks sit under a PeftModel
# The client's own weights when a run trains them fully, beside the adapter, by GPT2LMHeadModel's names
# ('transformer.h.0.attn.c_attn.weight', Conv1D layout): `model.load_state_dict(load_file(f), strict=False)`.
CLIENT_WEIGHTS = "client_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """An adapter's shape and its optimizer: what a training session is opened with."""

    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0  # LoRA dropout (0 keeps split and local training bitwise alike)
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # module kinds per block
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0  # seeds the adapter's initialisation

    def check(self, n_embd: int) -> None:
        if not 1 <= self.rank <= min(MAX_RANK, n_embd):
            raise InvalidInput(f"LoRA rank must be in 1..{min(MAX_RANK, n_embd)}, got {self.rank}")
        if not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise InvalidInput(f"LoRA alpha must be > 0 and dropout in [0, 1), got {self.alpha} and {self.dropout}")
        if not self.targets or set(self.targets) - set(MODULE_KINDS):
            raise InvalidInput(f"LoRA targets must be some of {', '.join(MODULE_KINDS)}, got {list(self.targets)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise InvalidInput(f"bad optimizer settings: lr {self.lr}, weight decay {self.weight_decay}, {self.betas}")

    def peft_config(self, layers: range | list[int]) -> LoraConfig:
        names = [f"h.{i}.{kind}" for i in layers for kind in self.targets]
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names)


def twin(part: GPT2) -> GPT2:
    """A second module of the same part that shares every weight tensor (no copy): an adapter goes on it while
    the original keeps serving without one."""
    check_adaptable(part)
    with torch.device("meta"):
        other = type(part)(part.config, part.layers, part.has_embed, part.has_head, part.attn_impl)
    other.load_state_dict(part.state_dict(), assign=True)
    if part.has_embed and part.has_head:
        other.lm_head.weight = other.wte.weight
    return other.requires_grad_(False).eval()


def add_lora(part: GPT2, settings: LoraSettings, layers: range | list[int] | None = None) -> GPT2:
    """Put a fresh adapter on `part`'s blocks, in place; only the adapter's weights train.

    Each module's A is drawn as PEFT draws it (Kaiming-uniform; B is zero) from a generator seeded by the seed
    and the module's name, so an adapter starts the same however the model is cut into parts."""
    settings.check(part.config.n_embd)
    check_adaptable(part)
    inject_adapter_in_model(settings.peft_config(part.layers if layers is None else layers), part)
    for name, module in part.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            g = torch.Generator().manual_seed(settings.seed * 1_000_003 + zlib.crc32(name.encode()))
            a = module.lora_A["default"].weight
            with torch.no_grad():
                a.copy_(torch.nn.init.kaiming_uniform_(torch.empty_like(a, device="cpu"), a=math.sqrt(5), generator=g))
                module.lora_B["default"].weight.zero_()
    for name, p in part.named_parameters():
        p.requires_grad_("lora_" in name)
    return part


def adapter_weights(part: GPT2) -> dict[str, torch.Tensor]:
    """The adapter's tensors by PEFT name ('h.3.attn.c_attn.lora_A.weight'); {} for a part without one."""
    if not hasattr(part, "peft_config"):
        return {}
    return {k: v.detach() for k, v in get_peft_model_state_dict(part).items()}


def load_adapter_weights(part: GPT2, weights: dict[str, torch.Tensor]) -> None:
    mine = adapter_weights(part)
    if set(weights) != set(mine):
        missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
        raise InvalidInput(f"adapter does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in weights.items():
        if v.shape != mine[k].shape:
            raise InvalidInput(f"adapter tensor {k} has shape {list(v.shape)}, expected {list(mine[k].shape)}")
    set_peft_model_state_dict(part, weights)


@dataclass
class Optimizer:
    """AdamW over a part's trainable weights, with its state by weight name (so it can cross the wire)."""

    part: GPT2 | tuple[GPT2, ...]  # several parts: one optimizer over them, a weight they share stepped once
    settings: LoraSettings
    names: list[str] = field(init=False)

    def __post_init__(self):
        parts = self.part if isinstance(self.part, tuple) else (self.part,)
        named, seen = [], set()
        for part in parts:
            for n, p in part.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    named.append((n, p))
        self.names = [_peft_name(n) for n, _ in named]
        s = self.settings
        self.opt = torch.optim.AdamW(
            [p for _, p in named], lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, foreach=False
        )

    @property
    def steps(self) -> int:
        state = self.opt.state.get(self.opt.param_groups[0]["params"][0], {})
        return int(state["step"]) if "step" in state else 0

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in zip(self.names, self.opt.param_groups[0]["params"], strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in self.opt.state.get(p, {}):
                    out[f"{name}.{key}"] = self.opt.state[p][key].detach()
        return out

    def load_state(self, state: dict[str, torch.Tensor], steps: int) -> None:
        if not state:
            return
        for name, p in zip(self.names, self.opt.param_groups[0]["params"], strict=True):
            try:
                avg, sq = state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"]
            except KeyError:
                raise InvalidInput(f"optimizer state has no entry for {name}") from None
            if avg.shape != p.shape or sq.shape != p.shape:
                raise InvalidInput(f"optimizer state for {name} has shape {list(avg.shape)}, expected {list(p.shape)}")
            self.opt.state[p] = {
                "step": torch.tensor(float(steps)),
                "exp_avg": avg.to(p.device, p.dtype).clone(),
                "exp_avg_sq": sq.to(p.device, p.dtype).clone(),
            }


def _peft_name(param_name: str) -> str:
    """'h.3.attn.c_attn.lora_A.default.weight' -> 'h.3.attn.c_attn.lora_A.weight' (PEFT's saved names)."""
    return param_name.replace(".default.", ".")


def save_peft(out: Path, weights: dict[str, torch.Tensor], settings: LoraSettings, base: str) -> None:
    """PEFT's files (adapter_config.json, adapter_model.safetensors) with GPT2LMHeadModel's module names."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = settings.peft_config(sorted(adapter_layers(weights)))
    cfg.target_modules = [f"transformer.{n}" for n in sorted(cfg.target_modules)]
    cfg.fan_in_fan_out = True  # HF's GPT-2 blocks are Conv1D ([in, out]); the adapter's own shapes are the same
    cfg.base_model_name_or_path = base
    cfg.save_pretrained(str(out))
    tensors = {HF_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def is_lora(name: str) -> bool:
    return ".lora_" in name


def save_trained(out: Path, weights: dict[str, torch.Tensor], settings: LoraSettings, base: str) -> None:
    """What a training run made: the LoRA tensors as a PEFT adapter, and the client's own fully trained weights
    (`--client-train full`), if any, beside it as CLIENT_WEIGHTS."""
    save_peft(out, {k: v for k, v in weights.items() if is_lora(k)}, settings, base)
    full = {k: v for k, v in weights.items() if not is_lora(k)}
    (out / CLIENT_WEIGHTS).unlink(missing_ok=True)
    if full:
        from safetensors.torch import save_file

        tensors = {"transformer." + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in full.items()}
        save_file(tensors, str(out / CLIENT_WEIGHTS), metadata={"format": "pt"})


def load_client_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fully trained client weights saved beside an adapter, by core HF name ('wte.weight', 'h.0.mlp.c_fc.weight'
    in Conv1D layout); {} when the run trained none."""
    from safetensors.torch import load_file

    f = path / CLIENT_WEIGHTS
    return {k.removeprefix("transformer."): v for k, v in load_file(str(f)).items()} if f.is_file() else {}


def load_peft(path: Path) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """Read an adapter saved by save_peft (or by PEFT on GPT2LMHeadModel): weights by core name, and settings."""
    from safetensors.torch import load_file

    cfg_file, st = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not st.is_file():
        raise InvalidInput(f"{path} is not a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("peft_type") != "LORA":
        raise InvalidInput(f"{path} holds a {raw.get('peft_type')} adapter; only LoRA is supported")
    kinds = sorted({".".join(t.split(".")[-2:]) for t in raw.get("target_modules") or []})
    settings = LoraSettings(
        rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0), targets=tuple(kinds)
    )
    weights = {k.removeprefix(HF_PREFIX): v for k, v in load_file(str(st)).items()}
    return weights, settings


def adapter_layers(weights: dict[str, torch.Tensor]) -> set[int]:
    return {int(k.split(".")[1]) for k in weights if k.startswith("h.")}


def only_layers(weights: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
    """The adapter's tensors for the blocks in `layers`."""
    keep = set(layers)
    return {k: v for k, v in weights.items() if int(k.split(".")[1]) in keep}


def adapter_digest(weights: dict[str, torch.Tensor]) -> str:
    """A hash of an adapter's tensors (names, shapes, float32 bytes): the same on both sides of the wire."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(weights):
        t = weights[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapted(
    part: GPT2, weights: dict[str, torch.Tensor], settings: LoraSettings, client: dict[str, torch.Tensor] | None = None
) -> GPT2:
    """`part` running the adapter's share for its blocks: a twin sharing its weights, or a copy with the trained
    weights of `client` (load_client_weights) where they touch it; `part` itself if neither has anything for it."""
    own = set(part.state_dict()) | ({"wte.weight"} if part.has_head else set())  # names are HF's
    changed = {k: v for k, v in (client or {}).items() if k in own}
    mine = only_layers(weights, part.layers)
    if not mine and not changed:
        return part
    base = with_weights(part, changed) if changed else twin(part)
    if not mine:
        return base.requires_grad_(False)
    model = add_lora(base, settings, sorted(adapter_layers(mine)))
    load_adapter_weights(model, mine)
    return model.requires_grad_(False)
