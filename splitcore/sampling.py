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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the logits' device, so that sampling never moves the vocabulary to the host."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _kept(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled logits, ids) of the tokens sampling may choose: the top k, then top-p's smallest prefix of them
    whose probability reaches top_p (at least one); the others' logits are -inf."""
    values, ids = torch.topk(logits.float() / params.temperature, min(params.top_k, logits.shape[-1]))
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keeps at least the first token
        values = values.masked_fill(drop, float("-inf"))
    return values, ids


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) logits vector, computed where the logits are: only the id reaches the host.

    Top-k keeps the k largest (sorted), top-p then keeps the smallest prefix of those whose probability
    reaches top_p; the token is drawn from what is left, renormalised."""
    if params.greedy:
        return int(torch.argmax(logits))
    if generator is None:
        generator = make_generator(params.seed, logits.device)
    values, ids = _kept(logits, params)
    choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
    return int(ids[choice])


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities (..., vocab), float32, that `sample` draws from, for logits (..., vocab); greedy is
    all on the argmax. Speculative sampling compares the model's and the draft's."""
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if params.greedy:
        return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    values, ids = _kept(logits, params)
    return out.scatter_(-1, ids, torch.softmax(values, dim=-1))
