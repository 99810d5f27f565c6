"""Defences of the cut: what the client does to its hidden states before they cross to the trunk.

The trunk's operator sees every hidden state the client sends (docs/privacy.md has the threat model), and
GPT-2's hidden states are close to plaintext: a learned inverter reads most tokens back from them. A defence
here is applied to each hidden state on its way out, in inference (SplitStepper) and in split training
(client/train.py), by the same `Noise.apply`:

- `clip`: each position's vector is scaled down to an RMS of at most `clip` (its L2 norm to clip * sqrt(d)),
  so that no position stands out by its size;
- `scale`: noise added to every coordinate, Gaussian or Laplace, with a standard deviation of `scale` times a
  reference RMS: `clip` when clipping (then the noise does not depend on the data: the Gaussian and Laplace
  mechanisms on vectors of bounded norm), otherwise each position's own RMS (noise relative to the signal).

The client knows its own noise, so it can repair part of the damage (Split-and-Denoise, arXiv 2310.09130):
`subtract_noise` takes what was added back out of the trunk's answer, where the trunk's residual stream carries
it straight through (its blocks' reaction to the noise stays); a `Denoiser` learns to repair some of the rest.

The noise comes from the client's own generator, seeded from the operating system unless a seed is given
(tests, benchmarks): the attacker knows the mechanism and its strength, never the draws. A strength of zero is
the undefended path itself: `apply` returns its input unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from splitcore.errors import InvalidInput

NOISE_KINDS = ("gaussian", "laplace")


@dataclass(frozen=True)
class Noise:
    """Norm clipping plus calibrated noise on each hidden state sent to the trunk."""

    kind: str = "gaussian"  # gaussian or laplace
    scale: float = 0.0  # noise std, as a multiple of the reference RMS (clip, else each position's own RMS)
    clip: float = 0.0  # cap on each position's RMS before the noise; 0 = no clipping

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise InvalidInput(f"unknown noise '{self.kind}'; choose one of {', '.join(NOISE_KINDS)}")
        for name, value in (("noise scale", self.scale), ("noise clip", self.clip)):
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be a finite number >= 0, got {value}")

    @property
    def active(self) -> bool:
        return self.scale > 0 or self.clip > 0

    def label(self) -> str:
        """A short name for tables and cache keys: 'none', 'gaussian 1', 'laplace 3 clip 2'."""
        if not self.active:
            return "none"
        text = f"{self.kind} {self.scale:g}" if self.scale > 0 else "clip only"
        return text + (f" clip {self.clip:g}" if self.clip > 0 else "")

    def apply(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What crosses instead of `h` (..., d). Differentiable in `h` (split training backpropagates through it);
        `h` itself when the defence is off."""
        if not self.active:
            return h
        rms = h.detach().float().pow(2).mean(-1, keepdim=True).sqrt()  # (..., 1)
        if self.clip > 0:
            h = h * (self.clip / rms.clamp_min(self.clip)).to(h.dtype)  # RMS at most clip
            ref = torch.full_like(rms, self.clip)
        else:
            ref = rms
        if self.scale == 0:
            return h
        z = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        if self.kind == "gaussian":
            z.normal_(generator=generator)
        else:  # Laplace with unit std: the difference of two exponentials of rate sqrt(2)
            e1 = torch.empty_like(z).exponential_(generator=generator)
            z = (e1 - z.exponential_(generator=generator)) / math.sqrt(2)
        return h + (z * ref * self.scale).to(h.dtype)


def noise_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The client's secret source of noise: seeded from the operating system unless `seed` is given."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    return g


class Protect:
    """A defence with its generator: the callable a stepper or a trainer runs on what it is about to send."""

    def __init__(self, noise: Noise, seed: int | None = None):
        self.noise, self.seed = noise, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.noise.active:
            return h
        g = self._generators.get(h.device)
        if g is None:
            g = self._generators[h.device] = noise_generator(self.seed, h.device)
        return self.noise.apply(h, g)


DENOISERS = ("none", "subtract")  # or the directory of a trained Denoiser


class Denoiser(nn.Module):
    """A learned repair on the client (Split-and-Denoise): after subtracting its own noise, a small MLP per
    position, from that and the bottom's clean output (both the client's), adds what the trunk's blocks made of
    the noise. Trained from trunk answers on public text, clean against noised (client/privacy.py). Starts as
    `subtract_noise` (its last layer is zero), and keeps no state, so decode steps run it as prefill does."""

    def __init__(self, d: int, hidden: int = 0):
        super().__init__()
        self.d, self.hidden = d, hidden or 4 * d
        self.ln_out, self.ln_in = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc, self.proj = nn.Linear(2 * d, self.hidden), nn.Linear(self.hidden, d)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, out: torch.Tensor, clean: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        base = subtract_noise(out, clean, sent).float()
        x = torch.cat([self.ln_out(base), self.ln_in(clean.to(base.device).float())], dim=-1)
        return (base + self.proj(F.gelu(self.fc(x)))).to(out.dtype)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "denoiser.safetensors"))
        (path / "denoiser.json").write_text(json.dumps({"d": self.d, "hidden": self.hidden}))

    @classmethod
    def load(cls, path: str | Path, d: int) -> Denoiser:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "denoiser.json").is_file():
            raise InvalidInput(
                f"--denoise {path}: not a trained denoiser (no denoiser.json); use none, subtract or the --out of "
                "python -m client train-denoiser"
            )
        meta = json.loads((path / "denoiser.json").read_text())
        if meta["d"] != d:
            raise InvalidInput(f"denoiser {path} is for hidden states of width {meta['d']}, this model's is {d}")
        model = cls(d, meta["hidden"])
        model.load_state_dict(load_file(str(path / "denoiser.safetensors")))
        return model.eval().requires_grad_(False)


def subtract_noise(out: torch.Tensor, clean: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """The trunk's answer to `sent` less what the defence added to `clean`: a block's output is its input plus
    what the block computes, so the perturbation rides the residual stream through every trunk block."""
    return out - (sent - clean).to(out.device, out.dtype)
