"""Pick the next token from logits: greedy, temperature, top-k, top-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitcore.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens; temperature 0 or top_k 0 means greedy (argmax)."""

    temperature: float = 0.8  # softmax temperature; 0 = greedy
    top_k: int = 50  # keep the k most likely tokens; 0 = greedy
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = off
    seed: int | None = None  # seed of the sampling generator; None = a fresh random seed

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 0

    def check(self) -> None:
        if not self.temperature >= 0:
            raise InvalidInput(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top-k must be >= 0 (0 = greedy), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top-p must be in (0, 1], got {self.top_p}")


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (vocab,) logits vector."""
    logits = logits.float().cpu()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keeps at least the first token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
