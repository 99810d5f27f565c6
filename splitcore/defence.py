"""Defences of the cut: what the client does to its hidden states before they cross to the trunk.

The trunk's operator sees every hidden state the client sends (docs/privacy.md has the threat model), and
GPT-2's hidden states are close to plaintext: a learned inverter reads most tokens back from them. A defence
here is applied to each hidden state on its way out, in inference (SplitStepper) and in split training
(client/split_training.py), by the same `Noise.apply`:

- `clip`: each position's vector is scaled down to an RMS of at most `clip` (its L2 norm to clip * sqrt(d)),
  so that no position stands out by its size;
- `scale`: noise added to every coordinate, Gaussian or Laplace, with a standard deviation of `scale` times a
  reference RMS: `clip` when clipping (then the noise does not depend on the data: the Gaussian and Laplace
  mechanisms on vectors of bounded norm), otherwise each position's own RMS (noise relative to the signal).

The client knows its own noise, so it can repair part of the damage (Split-and-Denoise, arXiv 2310.09130):
`subtract_noise` takes what was added back out of the trunk's answer, where the trunk's residual stream carries
it straight through (its blocks' reaction to the noise stays); a `Denoiser` learns to repair some of the rest.

The noise is the client's secret (`Protect`): a ChaCha20 keystream keyed by a 256-bit secret from the operating
system and the token prefix, so the same text always sends the same bits (repeats average nothing away) and no
one without the secret can reproduce a draw. The attacker knows the mechanism and its strength, never the draws.
A strength of zero is the undefended path itself: `apply` returns its input unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import nn

from splitcore.errors import InvalidInput
from splitcore.settings import NOISE_KINDS

logger = logging.getLogger(__name__)


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

    def apply(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """What crosses instead of `h` (..., d), with `z` the unit draws of the noise (`h`'s shape: a `Protect`'s
        secret ones on the client, `sample`'s in an attacker's simulation). Differentiable in `h` (split training
        backpropagates through it); `h` itself when the defence is off."""
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
        return h + (z.to(h.device) * ref * self.scale).to(h.dtype)

    def log_likelihood(self, sent: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """log p(sent | clean state h), up to a constant, over the last dimension (broadcast): the density an
        attacker who knows the mechanism scores candidate states with. Without noise, the negative squared
        distance (a point mass, read as the nearest candidate)."""
        rms = h.pow(2).mean(-1, keepdim=True).sqrt()
        if self.clip > 0:
            h = h * (self.clip / rms.clamp_min(self.clip))
            rms = torch.full_like(rms, self.clip)
        if self.scale == 0:
            return -(sent - h).pow(2).sum(-1)
        sigma = (self.scale * rms).clamp_min(1e-12).squeeze(-1)  # (...)
        d = h.shape[-1]
        if self.kind == "gaussian":
            return -(sent - h).pow(2).sum(-1) / (2 * sigma**2) - d * sigma.log()
        b = sigma / math.sqrt(2)  # Laplace of std sigma has scale sigma / sqrt(2)
        return -(sent - h).abs().sum(-1) / b - d * b.log()

    def sample(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Unit draws of this noise from an ordinary generator: for simulations (an attacker training on noise
        of its own), never for what the client sends (that is `Protect`'s)."""
        z = torch.empty(shape, dtype=torch.float32, device=device)
        if self.kind == "gaussian":
            return z.normal_(generator=generator)
        e1 = torch.empty_like(z).exponential_(generator=generator)  # Laplace of unit std: a difference of
        return (e1 - z.exponential_(generator=generator)) / math.sqrt(2)  # two exponentials of rate sqrt(2)


SECRET_BYTES = 32  # 256 bits: the client's secret key of its noise


def secret_from_seed(seed: int) -> bytes:
    """A fixed secret for tests and benchmarks (--defence-seed): anyone who knows the seed knows the noise."""
    return hashlib.blake2b(f"gpt2-split defence seed {seed}".encode(), digest_size=SECRET_BYTES).digest()


class Protect:
    """The client's defence with its secret: the callable that steppers and trainers run on what they send.

    The noise is a keyed function of the secret and the text: the unit draws at a position come from a ChaCha20
    keystream whose key is a keyed BLAKE2b chain over the token prefix up to and including that position
    (`digest_t = BLAKE2b_K(digest_{t-1} || token_t)`). So
    - no one without the secret (256 bits from the operating system, per client process) can reproduce or predict
      a draw, nor learn anything of it from what was sent;
    - the same prefix always sends the same bits (a repeat, a retry, a replayed session, an evaluation window, a
      chat history resent), so averaging repeats gains an attacker nothing;
    - different text gets independent noise. What this gives away: the trunk sees that two sends share a prefix.
    A generation's stream is keyed by its bottom's adapter too (`stream`)."""

    def __init__(self, noise: Noise, secret: bytes | None = None):
        secret = os.urandom(SECRET_BYTES) if secret is None else secret
        if len(secret) < 16:
            raise InvalidInput("a defence's secret needs at least 128 bits")
        self.noise = noise
        self._key = hashlib.blake2b(b"prefix chain", key=secret, digest_size=32).digest()

    def _digest(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    def root(self, context: str = "") -> bytes:
        """The digest of the empty prefix in `context`."""
        return self._digest(b"root " + context.encode())

    def chain(self, ids, start: bytes | None = None) -> list[bytes]:
        """The digests of each prefix that extends `start` (default: the empty prefix) by `ids`, one per token."""
        out, d = [], self.root() if start is None else start
        for t in ids:
            d = self._digest(d + int(t).to_bytes(4, "little"))
            out.append(d)
        return out

    def draws(self, digests: list[bytes], d: int) -> torch.Tensor:
        """Unit draws (len(digests), d) of the noise, each row from its prefix digest's ChaCha20 keystream."""
        zero, nonce = bytes(8 * d), bytes(16)
        stream = b"".join(Cipher(algorithms.ChaCha20(k, nonce), mode=None).encryptor().update(zero) for k in digests)
        u = torch.from_numpy(np.frombuffer(stream, dtype=np.uint32).reshape(len(digests), 2, d).astype(np.float64))
        u = (u + 0.5) / 2.0**32  # uniform on (0, 1), never 0 or 1
        if self.noise.kind == "gaussian":  # Box-Muller
            z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        else:  # Laplace of unit std by inversion
            c = u[:, 0] - 0.5
            z = -torch.sign(c) * torch.log1p(-2.0 * c.abs()) / math.sqrt(2)
        return z.float()

    def __call__(self, h: torch.Tensor, ids: torch.Tensor, context: str = "") -> torch.Tensor:
        """What crosses for `h` (B, T, d), the bottom's output (or a gradient) for token ids (B, T), each row a
        sequence from its first position (a prompt, a training window); `context` keys the draws as in `stream`."""
        if not self.noise.active:
            return h
        return torch.cat([self.stream(context)(h[i : i + 1], ids[i : i + 1]) for i in range(h.shape[0])])

    def with_noise(self, noise: Noise) -> Protect:
        """Another defence with the same secret (the gradient's, beside the hidden states')."""
        other = copy.copy(self)
        other.noise = noise
        return other

    def stream(self, context: str = "") -> NoiseStream:
        """A growing sequence's defence; `context` (the bottom's adapter) keys its chain, so that two bottoms never
        send the same draws for the same text (the trunk would read the difference of their outputs)."""
        return NoiseStream(self, context)


class NoiseStream:
    """One growing sequence's defence (a generation): the prefix digests so far, cut back with the sequence."""

    def __init__(self, protect: Protect, context: str = ""):
        self.protect, self.digests = protect, [protect.root(context)]

    def __call__(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What crosses for `h` (1, T, d), the bottom's output for the next T token ids (1, T) of the sequence."""
        p = self.protect
        if not p.noise.active:
            return h
        new = p.chain(ids.reshape(-1).tolist(), self.digests[-1])
        self.digests += new
        z = p.draws(new, h.shape[-1]).view(h.shape) if p.noise.scale > 0 else None
        return p.noise.apply(h, z)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on."""
        del self.digests[length + 1 :]


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


@dataclass
class Defence:
    """Everything the client does to what crosses, built in one place from its settings: the noise on the states
    it sends with its secret (`protect`), its repair of the trunk's answer (`repair`), and in split training the
    noise on the gradient it sends back (`protect_grad`), under the same secret. None where a part is off."""

    noise: Noise
    protect: Protect | None
    protect_grad: Protect | None
    repair: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None

    @classmethod
    def build(
        cls, noise: Noise, grad: Noise, denoise: str, seed: int | None, n_embd: int, device: torch.device
    ) -> Defence:
        """`denoise`: none, subtract, or a trained Denoiser's directory; `seed`: a fixed secret (tests and
        benchmarks, with a warning), else 256 bits from the operating system."""
        if seed is not None and (noise.active or grad.active):
            logger.warning(
                "--defence-seed %d: the noise is a function of this seed, and whoever knows it can remove it; "
                "for tests and benchmarks only",
                seed,
            )
        secret = Protect(Noise(), None if seed is None else secret_from_seed(seed))
        protect = secret.with_noise(noise) if noise.active else None
        repair = None
        if protect is not None and denoise == "subtract":
            repair = subtract_noise
        elif protect is not None and denoise != "none":
            repair = Denoiser.load(denoise, n_embd).to(device)
        return cls(noise, protect, secret.with_noise(grad) if grad.active else None, repair)
