"""Speculative decoding across the split: draft a few tokens on the client, verify them all in one trunk round
trip, keep what the model accepts, and roll the rest back.

Draft sources (one interface, `propose(ids, k, params, generator)` -> drafts and their probabilities):
- `PromptLookup`: the tokens that followed the latest earlier occurrence of the context's last n-gram; no model.
- `self` (`ModelDraft` over the bottom and top): the client's own parts without the trunk (embeddings, bottom
  blocks, top blocks, head), on caches of their own; no network at all.
- `draft:SPEC`: a small model of the same vocabulary on the client, e.g. a student distilled from the full model
  (splitcore/distill.py, `python -m client distill`).

Verification feeds the last chosen token and the k drafts in one step and reads the logits of every position
(`verify`). So every round trip yields 1 to k+1 tokens.
- Greedy: draft i is accepted while it is the argmax after the tokens before it, and the first disagreement (or
  the token after the last draft) is the model's own next token. The output is exactly plain greedy's.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): draft i, drawn from the draft's distribution q, is
  accepted with probability min(1, p(x)/q(x)), p being the model's distribution after the same tokens with the
  same temperature, top-k and top-p; at the first rejection the token is drawn from max(0, p - q) renormalised,
  and after k acceptances one more from p. Each token is then distributed exactly as plain sampling's. A
  deterministic draft (prompt lookup) has q all on its token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitcore.errors import InvalidInput
from splitcore.generate import PartRun
from splitcore.gpt2 import GPT2
from splitcore.sampling import SamplingParams, distribution, sample

SOURCES = ("none", "lookup", "self", "draft:SPEC")


def check_source(name: str) -> None:
    if name not in SOURCES[:-1] and not (name.startswith("draft:") and len(name) > len("draft:")):
        raise InvalidInput(
            f"--speculate must be one of none, lookup, self or draft:SPEC (a draft model: a directory from "
            f"python -m client distill); got '{name}'"
        )


class PromptLookup:
    """Draft the tokens that followed the latest earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to 1)."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, ids: list[int], k: int, params=None, generator=None) -> tuple[list[int], None]:
        """(drafts, None): deterministic drafts, whose distribution is all on them."""
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k], None
        return [], None

    def close(self) -> None:
        pass


class ModelDraft:
    """Drafts from a model on the client, on caches of its own that follow the accepted context: parts run in
    turn, the first embedding and the last ending in the LM head: `self` is the client's own bottom and top
    (skipping the trunk); `draft:DIR` a distilled student (splitcore/distill.py)."""

    def __init__(self, parts: list[GPT2], capacity: int, name: str):
        self.runs, self.name = [PartRun(part, capacity) for part in parts], name
        self.fed: list[int] = []  # the context its caches hold

    @torch.inference_mode()
    def _step(self, ids: list[int], params: SamplingParams, generator) -> tuple[int, torch.Tensor | None]:
        h = torch.tensor([ids])
        for run in self.runs[:-1]:
            h = run.run(h)
        logits = self.runs[-1].run(h, head=True)[0]
        if params.greedy:
            return int(logits.argmax()), None
        q = distribution(logits, params)
        return int(torch.multinomial(q, 1, generator=generator)), q

    def propose(
        self, ids: list[int], k: int, params: SamplingParams | None = None, generator=None
    ) -> tuple[list[int], torch.Tensor | None]:
        """(drafts, their distributions (k, vocab), or None when greedy)."""
        params = params or SamplingParams(0.0, 0)
        keep = 0  # the longest common prefix of what the caches hold and the context
        while keep < min(len(self.fed), len(ids) - 1) and self.fed[keep] == ids[keep]:
            keep += 1
        for run in self.runs:
            run.truncate(keep)
        self.fed = ids[:keep]
        token, q = self._step(ids[keep:], params, generator)
        drafts, qs = [token], [q]
        self.fed = list(ids)
        for _ in range(k - 1):
            self.fed.append(drafts[-1])
            token, q = self._step(drafts[-1:], params, generator)
            drafts.append(token)
            qs.append(q)
        return drafts, None if params.greedy else torch.stack(qs)

    def close(self) -> None:
        for run in self.runs:
            run.close()


class DraftLength:
    """How many tokens to draft next: the k in [0, k_max] that maximises the expected tokens per second of a
    round, (1 - a^(k+1)) / (1 - a) tokens (each draft accepted with probability a, independently) over its time,
    v + e + k d: a plain step's round trip v, what a verification costs beyond it e (its logits for every
    position, the rollback; nearly flat in k, as a decode step is bound by weight reads), and each draft's own
    cost d. All are moving averages of what the generation measured: the acceptance, the rounds
    without drafts (the first decode round is one, to measure v), the extra time of those with drafts, the draft
    source's time. A slow trunk or a cheap, good draft pushes k up; poor acceptance or costly drafts pull it
    down, to 0 (plain decoding) when drafting does not pay, with a one-draft probe now and then to notice when
    it would again (every 8 rounds, twice as seldom after each probe that fails, up to every 64). An engine keeps
    one per draft source across its generations, so a new generation starts from what the last ones learned.
    `adaptive=False` always drafts k_max."""

    def __init__(self, k_max: int, adaptive: bool = True, weight: float = 0.3, probe_every: int = 8):
        if k_max < 1:
            raise ValueError(f"the draft length must be at least 1, got {k_max}")
        self.k_max, self.adaptive, self.weight, self.probe_every = k_max, adaptive, weight, probe_every
        self.idle = 0  # rounds in a row without drafts
        self.probing = False  # the latest round was a probe
        self.acceptance = 0.6  # a prior until the first verification
        self.plain_s: float | None = None  # a round trip without drafts
        self.extra_s = 0.0  # what a verification costs beyond a plain round trip
        self.draft_s = 0.0  # what each draft costs the draft source

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        if self.probing and drafted:
            self.probe_every = 8 if accepted else min(64, self.probe_every * 2)
        self.probing = False
        if not drafted:
            self.plain_s = self._ema(self.plain_s, verify_s)
            return
        self.acceptance = self._ema(self.acceptance, accepted / drafted)
        self.draft_s = self._ema(self.draft_s, draft_s / drafted)
        if self.plain_s is not None:
            self.extra_s = self._ema(self.extra_s, max(0.0, verify_s - self.plain_s))

    def expected_rate(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        cost = (self.plain_s or 0.0) + (self.extra_s if k else 0.0) + k * self.draft_s
        return (1 - a ** (k + 1)) / (1 - a) / (cost + 1e-9)

    def next(self) -> int:
        if not self.adaptive:
            return self.k_max
        if self.plain_s is None:
            return 0  # measure a plain round first
        k = max(range(self.k_max + 1), key=self.expected_rate)
        self.idle = self.idle + 1 if k == 0 else 0
        if self.idle > self.probe_every:
            self.idle, self.probing = 0, True
            return 1
        return k


@dataclass
class SpeculationStats:
    source: str
    calls: int = 0  # verification round trips: steps with drafts
    rounds: int = 0  # trunk round trips of the generation, with drafts or without, the prompt's included
    drafted: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)  # drafts of each verification

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self, tokens: int) -> dict:
        return {
            "source": self.source,
            "verifications": self.calls,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance,
            "round_trips": self.rounds,
            "tokens_per_round_trip": tokens / self.rounds if self.rounds else 0.0,
            "mean_draft_length": sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
        }


def verify(
    drafts: list[int],
    q: torch.Tensor | None,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """The tokens a verification yields, and how many drafts it accepted. `logits` (len(drafts) + 1, vocab): the
    model's after the last chosen token and after each draft; `q` (len(drafts), vocab): the drafts'
    distributions, or None for deterministic drafts (all on the drafted token)."""
    if params.greedy:
        preds = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and preds[accepted] == drafts[accepted]:
            accepted += 1
        return drafts[:accepted] + [preds[accepted]], accepted
    if not drafts:  # a plain step: drawn as plain sampling draws (over the top-k only, not the vocabulary)
        return [sample(logits[0], params, generator)], 0
    p = distribution(logits, params)
    if q is None:
        q = torch.zeros_like(p[: len(drafts)]).scatter_(-1, torch.tensor(drafts, device=p.device)[:, None], 1.0)
    q = q.to(p.device)
    u = torch.rand(len(drafts), generator=generator, device=generator.device).tolist()
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), float(q[i, x])
        if qx > 0 and u[i] * qx < px:  # accept with probability min(1, p(x)/q(x))
            continue
        residual = (p[i] - q[i]).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection cannot happen; draw from p
            residual = p[i]
        support = residual.nonzero()[:, 0]  # at most top-k tokens: a draw over them, not the vocabulary
        return drafts[:i] + [int(support[torch.multinomial(residual[support], 1, generator=generator)])], i
    return drafts + [sample(logits[len(drafts)], params, generator)], len(drafts)


@dataclass
class Speculation:
    """Speculative decoding as a mode of the one generation loop (`generate(..., speculation=...)`): where drafts
    come from, how many a round (`length`), and the statistics the rounds fill."""

    draft: object  # a draft source: PromptLookup, ModelDraft
    length: DraftLength
    stats: SpeculationStats

    @classmethod
    def start(
        cls, draft, params: SamplingParams, stats: SpeculationStats, length: DraftLength | None = None, k: int = 8
    ) -> Speculation:
        """At most `k` drafts a round, fewer when `length` (kept by the caller across generations, or a new one)
        expects more tokens per second from fewer; a fixed k when sampling with a seed, which must give the same
        tokens every run (adapting to measured timings would not)."""
        if not params.greedy and params.seed is not None:
            length = DraftLength(k, adaptive=False)
        return cls(draft, length or DraftLength(k), stats)

    def verify(self, drafts, q, logits, params, generator) -> tuple[list[int], int]:
        return verify(drafts, q, logits, params, generator)

    def record(self, drafted: int, accepted: int, draft_s: float, step_s: float, first: bool) -> None:
        """One round: its drafts, how many were accepted, and what drafting and the step took."""
        self.stats.rounds += 1
        if not first:  # a prompt's step is no verification
            self.length.update(drafted, accepted, draft_s, step_s)
        if drafted:
            self.stats.calls += 1
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            self.stats.lengths.append(drafted)

    def close(self) -> None:
        self.draft.close()
