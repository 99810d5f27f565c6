"""The one generation loop (prefill, then token-by-token decode) used by the split client and the baseline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GPT2LMHeadModel

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.kvcache import growing_cache
from splitcore.parts import Bottom, Top, Trunk
from splitcore.sampling import SamplingParams, make_generator, sample
from splitcore.stats import GenerationStats, TokenTiming


@dataclass
class StepResult:
    """Logits of the last position and where the step's time went."""

    logits: torch.Tensor  # (vocab,)
    client_ms: float  # local compute
    server_ms: float | None = None  # trunk compute reported by the server, None without a server
    trunk_wall_ms: float | None = None  # wall time of the trunk call as seen by the client
    bytes_out: int = 0
    bytes_in: int = 0


class Stepper(Protocol):
    """Runs token ids through a model with its own KV caches; one stepper per generation."""

    n_positions: int

    def step(self, ids: torch.Tensor) -> StepResult: ...

    def close(self) -> None: ...


class TrunkLink(Protocol):
    """Where a split stepper sends hidden states: an in-process trunk or a server session."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, float | None, int, int]:
        """Hidden states out -> (hidden states back, server compute ms or None, bytes out, bytes in)."""
        ...

    def close(self) -> None: ...


class LocalTrunkLink:
    """The trunk in this process, with its own cache; no bytes move."""

    def __init__(self, trunk: Trunk, capacity: int = 0):
        self.trunk = trunk
        self.cache = trunk.new_cache(capacity)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, float | None, int, int]:
        t0 = time.perf_counter()
        out = self.trunk(h, self.cache)
        return out, (time.perf_counter() - t0) * 1e3, 0, 0

    def close(self) -> None:
        self.cache = None


class FullStepper:
    """The unsplit Hugging Face model; the whole step is client compute."""

    def __init__(self, model: GPT2LMHeadModel, capacity: int = 0):
        self.model = model
        self.cache = growing_cache(capacity)  # the split parts' cache too: the comparison stays like for like
        self.n_positions = model.config.n_positions

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        out = self.model(ids.to(self.model.device), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return StepResult(out.logits[0, -1], (time.perf_counter() - t0) * 1e3)

    def close(self) -> None:
        self.cache = None


class SplitStepper:
    """Bottom and top here, trunk behind a link: ids -> bottom -> trunk -> top -> logits."""

    def __init__(self, bottom: Bottom, top: Top, link: TrunkLink, capacity: int = 0):
        self.bottom, self.top, self.link = bottom, top, link
        self.bottom_cache, self.top_cache = bottom.new_cache(capacity), top.new_cache(capacity)
        self.n_positions = bottom.n_positions
        # the latest step's client_ms, part by part: bottom, top blocks, final norm + LM head
        self.last_bottom_ms = self.last_top_ms = self.last_head_ms = 0.0

    def step(self, ids: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        h = self.bottom(ids.to(self.bottom.device), self.bottom_cache)  # (1, T, C)
        t1 = time.perf_counter()
        h, server_ms, b_out, b_in = self.link.forward(h)
        t2 = time.perf_counter()
        h = self.top.blocks(h, self.top_cache)
        t3 = time.perf_counter()
        logits = self.top.head(h)[0]
        t4 = time.perf_counter()
        self.last_bottom_ms, self.last_top_ms, self.last_head_ms = (t1 - t0) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3
        return StepResult(logits, ((t1 - t0) + (t4 - t2)) * 1e3, server_ms, (t2 - t1) * 1e3, b_out, b_in)

    def close(self) -> None:
        self.link.close()


@dataclass
class TokenEvent:
    """One generated token, streamed as soon as it is chosen."""

    index: int  # 0 for the first generated token
    token_id: int
    text: str  # new text this token completes (may be "" while a multi-byte character is incomplete)
    timing: TokenTiming


def check_request(prompt_ids: list[int], max_new_tokens: int, n_positions: int, params: SamplingParams) -> None:
    """Readable errors for a request that cannot run: empty prompt, bad sampling settings, too long."""
    if not prompt_ids:
        raise InvalidInput("the prompt is empty: give at least one token of text")
    if max_new_tokens < 1:
        raise InvalidInput(f"max tokens must be at least 1, got {max_new_tokens}")
    params.check()
    if len(prompt_ids) + max_new_tokens > n_positions:
        raise LimitExceeded(
            f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens = "
            f"{len(prompt_ids) + max_new_tokens} is past the model's context of {n_positions} tokens; "
            f"shorten the prompt or lower max tokens to {max(0, n_positions - len(prompt_ids))}"
        )


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 characters."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.emitted = decode, [], ""

    def push(self, token_id: int, last: bool = False) -> str:
        """Text completed by this token; with `last`, everything still held back too."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") and not last:
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


def generate(
    stepper: Stepper,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    eos_token_id: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TokenEvent]:
    """Prefill the prompt, then decode one token at a time, yielding each token as it is chosen.

    The stepper is closed when the loop ends, however it ends (EOS, max tokens, error, consumer stops)."""
    check_request(prompt_ids, max_new_tokens, stepper.n_positions, params)
    generator = make_generator(params.seed)
    text = IncrementalDecoder(decode)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    try:
        for index in range(max_new_tokens):
            t0 = time.perf_counter()
            r = stepper.step(ids)
            t1 = time.perf_counter()
            token = sample(r.logits, params, generator)
            total = (time.perf_counter() - t0) * 1e3
            client = r.client_ms + (time.perf_counter() - t1) * 1e3
            network = None if r.server_ms is None else max(0.0, (r.trunk_wall_ms or 0.0) - r.server_ms)
            timing = TokenTiming(total, client, r.server_ms, network, r.bytes_out, r.bytes_in)
            stats.add(timing)
            stats.wall_s = time.perf_counter() - start
            last = index == max_new_tokens - 1 or (eos_token_id is not None and token == eos_token_id)
            yield TokenEvent(index, token, text.push(token, last), timing)
            if last:
                break
            ids = torch.tensor([[token]], dtype=torch.long)
    finally:
        stepper.close()
