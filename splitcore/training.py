"""Training pieces without networks: a part trained from the outside (forward, then backward of its output's
gradient), the language-model loss, and text data in batches of token windows with a held-out part.

PartTrainer is what the trunk server runs per training session, and what the client runs on its own parts;
the local reference (client/split_training.py) trains the whole model with plain autograd instead, so that the split
is checked against something that shares none of its plumbing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2
from splitcore.lora import LoraSettings, Optimizer


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next token: logits (B, T, vocab), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class PartTrainer:
    """A part with an adapter and its optimizer, trained one batch at a time by someone else's loss.

    `forward` keeps what `backward` needs (or only the input, with `recompute`: the forward then runs again
    under autograd at backward time, trading compute for memory as Petals does); `backward` takes the gradient
    of the loss with respect to the output, returns the gradient with respect to the input (None for token
    ids), and steps the optimizer."""

    def __init__(self, part: GPT2, settings: LoraSettings, recompute: bool = False):
        self.part, self.recompute = part, recompute
        self.optimizer = Optimizer(part, settings)
        self.pending: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # step, input, output

    def forward(self, step: int, x: torch.Tensor, eval: bool = False) -> torch.Tensor:
        x = x.to(self.part.device) if self.part.has_embed else x.to(self.part.device, self.part.dtype)
        if eval:
            with torch.no_grad():
                return self.part(x, all_positions=True)
        if x.is_floating_point():
            x = x.detach().requires_grad_(True)
        if self.recompute:
            with torch.no_grad():
                out = self.part(x, all_positions=True)
            self.pending = (step, x, None)
            return out
        with torch.enable_grad():
            out = self.part(x, all_positions=True)
        self.pending = (step, x, out)
        return out.detach()

    def backward(self, step: int, grad: torch.Tensor) -> torch.Tensor | None:
        if self.pending is None:
            raise InvalidInput(f"backward for step {step} before its forward")
        done, x, out = self.pending
        if step != done:
            raise InvalidInput(f"backward for step {step}, but the latest forward was step {done}")
        if out is None:  # recompute
            with torch.enable_grad():
                out = self.part(x, all_positions=True)
        if list(grad.shape) != list(out.shape):
            raise InvalidInput(f"gradient has shape {list(grad.shape)}, the output had {list(out.shape)}")
        if not bool(torch.isfinite(grad).all()):
            raise InvalidInput("gradient contains NaN or infinite values")
        self.pending = None
        out.backward(grad.to(out.device, out.dtype))
        self.optimizer.step()
        return x.grad if x.is_floating_point() else None

    def drop_pending(self) -> None:
        self.pending = None


def held_bytes(part: GPT2, x: torch.Tensor, recompute: bool = False) -> int:
    """Bytes a training session holds between a batch's forward and its backward: what autograd saves from a
    forward of `part` over `x` (activations: the frozen and adapter weights it also saves are not counted,
    they are held anyway), or with `recompute` the input alone. Counted by storage, as allocated."""
    if recompute:
        return x.untyped_storage().nbytes()
    weights = {p.untyped_storage().data_ptr() for p in part.parameters()}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    x = x.detach().requires_grad_(x.is_floating_point())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        part(x, all_positions=True)
    return sum(held.values())


def read_text(path: str | Path, what: str = "text") -> tuple[str, list[Path]]:
    """The text of a file, or of the text files (.txt, .md, no suffix) under a directory, and those files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ""))
    elif path.is_file():
        files = [path]
    else:
        raise InvalidInput(f"{what} '{path}' does not exist (give a text file or a directory of them)")
    if not files:
        raise InvalidInput(f"no text files (.txt, .md) in {path}")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files), files


@dataclass
class TextData:
    """Token ids of some text files, the last `eval_fraction` held out; batches of random windows."""

    train: torch.Tensor  # (N,) token ids
    held_out: torch.Tensor
    block: int  # tokens per window (T)
    sources: list[str]

    @classmethod
    def from_path(cls, path: str | Path, encode, block: int, eval_fraction: float = 0.1) -> TextData:
        text, files = read_text(path, "training data")
        ids = torch.tensor(encode(text), dtype=torch.long)
        held = max(block + 1, int(len(ids) * eval_fraction))
        if len(ids) < held + 2 * block:
            raise InvalidInput(
                f"{path} has {len(ids)} tokens: too little for windows of {block} tokens and a held-out part; "
                f"give more text or a smaller --block-size"
            )
        return cls(ids[:-held], ids[-held:], block, [str(p) for p in files])

    def batch(self, step: int, size: int, seed: int) -> torch.Tensor:
        """The training batch of `step`: the same for the same (step, seed), so a resumed run goes on alike."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.block, (size,), generator=g)
        return torch.stack([self.train[s : s + self.block] for s in starts.tolist()])

    def eval_batches(self, size: int, max_batches: int) -> list[torch.Tensor]:
        """Consecutive windows of the held-out text, in batches."""
        n = min((len(self.held_out) - 1) // self.block, size * max_batches)
        windows = [self.held_out[i * self.block : (i + 1) * self.block] for i in range(n)]
        return [torch.stack(windows[i : i + size]) for i in range(0, len(windows), size)]


def fit(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    peak_lr: float,
    warmup: int,
    batch_of: Callable[[int], torch.Tensor],
    loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    progress: Callable[[int, object], None] | None = None,
    clip: float | None = 1.0,
    cosine: bool = True,
) -> None:
    """Train `model` in one process for `steps` steps (the trained presets, distillation, the privacy attacks,
    the denoiser): the learning rate warms up linearly over `warmup` steps and then follows a cosine down to a
    tenth of `peak_lr` (`cosine=False`: stays at the peak); gradients are clipped to norm `clip` (None: not
    clipped). `loss_of(batch)` gives the loss and what `progress(step, ...)` is told."""
    for step in range(1, steps + 1):
        lr = peak_lr * min(1.0, step / warmup)
        if cosine:
            lr *= 0.55 + 0.45 * math.cos(math.pi * step / steps)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.enable_grad():
            loss, report = loss_of(batch_of(step))
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, report)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
