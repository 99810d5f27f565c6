"""The one generation loop (prefill, then token-by-token decode) used by the split client and the baseline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from splitcore.cudagraph import DecoderPool
from splitcore.defence import Protect
from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.gpt2 import GPT2
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

    def step(self, ids: torch.Tensor, all_positions: bool = False) -> StepResult: ...

    def truncate(self, length: int) -> None: ...

    def close(self) -> None: ...


class TrunkReply(NamedTuple):
    """What the trunk answers one call: a step of generation or of training."""

    tensor: torch.Tensor  # its output (a forward), or the gradient at its input (a training backward)
    server_ms: float | None  # its compute, as it measured it; None where nothing said
    bytes_out: int  # this call's bytes to it, framing included (0 in process)
    bytes_in: int


class TrunkLink(Protocol):
    """Where a split stepper sends hidden states: an in-process trunk or a server session."""

    def forward(self, h: torch.Tensor) -> TrunkReply:
        """Hidden states out -> the trunk's hidden states back, its compute ms, the bytes each way."""
        ...

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on."""
        ...

    def close(self) -> None: ...


class PartRun:
    """One part and its KV cache for one generation. Steps of several positions (the prefill) run eagerly; with
    a DecoderPool, one-position steps run on a StaticDecoder (a CUDA graph on a GPU) over the same cache."""

    def __init__(self, part: GPT2, capacity: int = 0, pool: DecoderPool | None = None):
        self.part, self.pool = part, pool
        self.decoder = pool.acquire(capacity) if pool is not None else None
        self.cache = self.decoder.cache if self.decoder is not None else part.new_cache(capacity)

    def run(self, x: torch.Tensor, head: bool = False, all_positions: bool = False) -> torch.Tensor:
        """Hidden states (B, T, C) of the new positions; with `head`, the last position's logits (B, vocab), or
        with `all_positions` every new position's (B, T, vocab)."""
        d = self.decoder
        if d is not None and x.shape[1] == 1 and x.shape[0] == d.rows and head == self.part.has_head:
            if not all_positions:
                return self.decoder.step(x)  # the graph of a head part ends in its logits
        x = x.to(self.part.device) if self.part.has_embed else x.to(self.part.device, self.part.dtype)
        h = self.part.hidden(x, self.cache)
        return self.part.logits(h, all_positions) if head else h

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (rejected drafts of speculative decoding)."""
        self.cache.truncate(length)

    def close(self) -> None:
        if self.decoder is not None:
            self.pool.release(self.decoder)
        self.decoder = self.cache = None


class LocalTrunkLink:
    """The trunk in this process, with its own cache; no bytes move."""

    def __init__(self, trunk: GPT2, capacity: int = 0, pool: DecoderPool | None = None):
        self.trunk = PartRun(trunk, capacity, pool)

    @torch.inference_mode()
    def forward(self, h: torch.Tensor) -> TrunkReply:
        t0 = time.perf_counter()
        out = self.trunk.run(h)
        return TrunkReply(out, (time.perf_counter() - t0) * 1e3, 0, 0)

    def truncate(self, length: int) -> None:
        self.trunk.truncate(length)

    def close(self) -> None:
        self.trunk.close()


class FullStepper:
    """The unsplit model (the same core as the parts); the whole step is client compute."""

    def __init__(self, model: GPT2, capacity: int = 0, pool: DecoderPool | None = None):
        self.model = PartRun(model, capacity, pool)
        self.n_positions = model.n_positions

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, all_positions: bool = False) -> StepResult:
        t0 = time.perf_counter()
        logits = self.model.run(ids, head=True, all_positions=all_positions)[0]
        return StepResult(logits, (time.perf_counter() - t0) * 1e3)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on: the next step goes on as if they had never been fed."""
        self.model.truncate(length)

    def close(self) -> None:
        self.model.close()


class SplitStepper:
    """Bottom and top here, trunk behind a link: ids -> bottom -> trunk -> top -> logits."""

    def __init__(
        self,
        bottom: GPT2,
        top: GPT2,
        link: TrunkLink,
        capacity: int = 0,
        pools: dict | None = None,
        protect: Protect | None = None,
        context: str = "",
        tap: Callable[[torch.Tensor], None] | None = None,
        repair: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        """`protect`: the defence applied to every hidden state before it crosses (splitcore/defence.py); `tap`
        hears each step's hidden states exactly as they cross (the privacy meter reads them); `repair` takes the
        trunk's answer, the bottom's clean output and what was sent, and returns the answer the top runs on."""
        pools = pools or {}
        self.bottom = PartRun(bottom, capacity, pools.get("bottom"))
        self.top = PartRun(top, capacity, pools.get("top"))
        self.link, self.tap, self.repair = link, tap, repair
        self.protect = None if protect is None else protect.stream(context)  # this sequence's secret noise
        self.n_positions = bottom.n_positions
        # the latest step's client_ms, part by part: bottom, top blocks, final norm + LM head (0 when the top's
        # decode step is one CUDA graph: the head is inside it)
        self.last_bottom_ms = self.last_top_ms = self.last_head_ms = 0.0

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, all_positions: bool = False) -> StepResult:
        """Logits of the last new position (vocab,), or with `all_positions` of every new one (T, vocab)."""
        t0 = time.perf_counter()
        clean = self.bottom.run(ids)  # (1, T, C)
        sent = clean if self.protect is None else self.protect(clean, ids)
        if self.tap is not None:
            self.tap(sent)
        t1 = time.perf_counter()
        h, server_ms, b_out, b_in = self.link.forward(sent)
        t2 = time.perf_counter()
        if self.repair is not None:
            h = self.repair(h, clean, sent)
        if self.top.decoder is not None and h.shape[1] == 1 and not all_positions:
            logits, t3 = self.top.run(h, head=True)[0], None
        else:
            h = self.top.run(h)
            t3 = time.perf_counter()
            logits = self.top.part.logits(h, all_positions)[0]
        t4 = time.perf_counter()
        t3 = t4 if t3 is None else t3
        self.last_bottom_ms, self.last_top_ms, self.last_head_ms = (t1 - t0) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3
        return StepResult(logits, ((t1 - t0) + (t4 - t2)) * 1e3, server_ms, (t2 - t1) * 1e3, b_out, b_in)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on, here and on the trunk (with its next step)."""
        self.bottom.truncate(length)
        self.top.truncate(length)
        self.link.truncate(length)
        if self.protect is not None:
            self.protect.truncate(length)

    def close(self) -> None:
        try:
            self.link.close()
        finally:
            self.bottom.close()
            self.top.close()


@dataclass
class TokenEvent:
    """One generated token, streamed as soon as it is chosen."""

    index: int  # 0 for the first generated token
    token_id: int
    text: str  # new text this token completes (may be "" while a multi-byte character is incomplete)
    timing: TokenTiming
    logprob: float | None = None  # log-probability of the token under the model (asked for with `logprobs`)
    top_logprobs: list[tuple[int, float]] | None = None  # the `logprobs` most likely tokens and theirs


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
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 characters.

    Each push decodes only a short window (the ids since the last emitted text, plus the few before them for
    context), not every id so far: TGI's prefix/read offsets. Linear in the generation's length."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids = decode, []
        self.prefix, self.read = 0, 0  # ids[prefix:read] were decoded and emitted last time

    def push(self, token_id: int, last: bool = False) -> str:
        """Text completed by this token; with `last`, everything still held back too."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") and not last:
            return ""
        delta = text[len(before) :] if text.startswith(before) else text
        self.prefix, self.read = self.read, len(self.ids)
        return delta


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under (vocab,) logits, and the k most likely tokens' (id, log-probability)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, k)
    return float(lp[token]), list(zip(ids.tolist(), values.tolist(), strict=True))


PromptLogprobs = list[tuple[float, list[tuple[int, float]]]]  # per prompt token after the first: (its, the top k)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> PromptLogprobs:
    """From the (T, vocab) logits of a prompt's T positions: each prompt token after the first, its log-probability
    under the positions before it and the k most likely tokens' there (the first token has none: nothing precedes
    it)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # position i predicts token i + 1
    chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
    values, top = torch.topk(lp, k, dim=-1)
    tops = [list(zip(i, v, strict=True)) for i, v in zip(top.tolist(), values.tolist(), strict=True)]
    return list(zip(chosen, tops, strict=True))


def score(stepper: Stepper, prompt_ids: list[int], k: int = 0) -> PromptLogprobs:
    """The prompt's log-probabilities alone (`prompt_logprobs`), in one forward; closes the stepper."""
    if not prompt_ids:
        raise InvalidInput("the prompt is empty: give at least one token of text")
    if len(prompt_ids) > stepper.n_positions:
        raise LimitExceeded(f"prompt of {len(prompt_ids)} tokens is past the model's context of {stepper.n_positions}")
    try:
        r = stepper.step(torch.tensor([prompt_ids], dtype=torch.long), all_positions=True)
        return prompt_logprobs(r.logits, prompt_ids, k)
    finally:
        stepper.close()


def generate(
    stepper: Stepper,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    eos_token_id: int | None = None,
    stats: GenerationStats | None = None,
    logprobs: int | None = None,
    prompt_lps: PromptLogprobs | None = None,
    speculation=None,
) -> Iterator[TokenEvent]:
    """Prefill the prompt, then decode, yielding each token as it is chosen: the one generation loop.

    - `logprobs` (0 or more): each event carries the token's log-probability under the model (its logits before
      temperature, top-k and top-p) and the `logprobs` most likely tokens' (OpenAI's convention).
    - `prompt_lps` (a list): the prefill computes the logits of every prompt position, and the list gets the
      prompt's own log-probabilities (`prompt_logprobs`, with the top `logprobs or 0`) before the first token is
      yielded; without it, the prefill computes the last position's alone.
    - `speculation` (a splitcore.speculative.Speculation): each round drafts a few tokens, feeds them with the last
      chosen one in a single step, keeps what the model accepts (`verify`) and rolls the rest back; greedy gives
      the same tokens as without, sampling the same distribution. Without it every round drafts nothing.

    The stepper (and the draft source) are closed when the loop ends, however it ends (EOS, max tokens, error,
    consumer stops)."""
    check_request(prompt_ids, max_new_tokens, stepper.n_positions, params)
    text = IncrementalDecoder(decode)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    rounds = _Rounds(stepper, prompt_ids, max_new_tokens, params, speculation)
    try:
        while True:
            new, logits, timings = rounds.next(prompt_lps, logprobs)
            for j, (token, timing) in enumerate(zip(new, timings, strict=True)):
                stats.add(timing)
                stats.wall_s = time.perf_counter() - start
                rounds.ids.append(token)
                rounds.produced += 1
                last = rounds.produced == max_new_tokens or (eos_token_id is not None and token == eos_token_id)
                event = TokenEvent(rounds.produced - 1, token, text.push(token, last), timing)
                if logprobs is not None:
                    event.logprob, event.top_logprobs = token_logprobs(logits[j], token, logprobs)
                yield event
                if last:
                    return
            rounds.feed = [new[-1]]  # the model's own token: chosen, not yet fed
    finally:
        stepper.close()
        if speculation is not None:
            speculation.close()


class _Rounds:
    """The rounds of one generation: each feeds the latest token (the prompt, first) with any drafts in one step,
    and chooses one token or more (`generate` yields them)."""

    def __init__(self, stepper: Stepper, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 speculation) -> None:  # fmt: skip
        self.stepper, self.params, self.speculation, self.max_new_tokens = stepper, params, speculation, max_new_tokens
        self.prompt_ids, self.ids, self.feed, self.produced = prompt_ids, list(prompt_ids), list(prompt_ids), 0
        self.generator = None  # made on the logits' device at the first token

    def next(self, prompt_lps: PromptLogprobs | None, logprobs: int | None):
        """One round: (tokens chosen, the logits they were chosen from, each token's share of the round's time)."""
        stepper, params, speculation = self.stepper, self.params, self.speculation
        first = not self.produced
        t0 = time.perf_counter()
        drafts, q = [], None
        if speculation is not None and not first:
            room = min(
                speculation.length.next(),
                self.max_new_tokens - self.produced - 1,
                stepper.n_positions - len(self.ids) - 1,
            )
            if room > 0:
                drafts, q = speculation.draft.propose(self.ids, room, params, self.generator)
        t_drafted = time.perf_counter()
        every = bool(drafts) or (first and prompt_lps is not None)
        r = stepper.step(torch.tensor([self.feed + drafts], dtype=torch.long), all_positions=every)
        t_stepped = time.perf_counter()
        if self.generator is None and not params.greedy:
            self.generator = make_generator(params.seed, r.logits.device)
        if first and prompt_lps is not None:
            prompt_lps.extend(prompt_logprobs(r.logits, self.prompt_ids, logprobs or 0))
        logits = r.logits[len(self.feed) - 1 :] if every else r.logits[None]  # after the last fed token, each draft
        if drafts:
            new, accepted = speculation.verify(drafts, q, logits, params, self.generator)
            if accepted < len(drafts):  # roll the rejected drafts back, here and on the trunk
                stepper.truncate(len(self.ids) + accepted)
        else:
            new, accepted = [sample(logits[0], params, self.generator)], 0
        if speculation is not None:
            speculation.record(len(drafts), accepted, t_drafted - t0, t_stepped - t_drafted, first=first)
        return new, logits, _timings(r, len(new), t0, t_drafted, t_stepped)


def _timings(r: StepResult, share: int, t0: float, t_drafted: float, t_stepped: float) -> list[TokenTiming]:
    """A round's time and bytes, shared among the `share` tokens it yields (its bytes booked on the first)."""
    total = (time.perf_counter() - t0) * 1e3
    client = r.client_ms + (t_drafted - t0 + time.perf_counter() - t_stepped) * 1e3  # + drafting, sampling
    network = None if r.server_ms is None else max(0.0, (r.trunk_wall_ms or 0.0) - r.server_ms)
    return [
        TokenTiming(
            total / share,
            client / share,
            None if r.server_ms is None else r.server_ms / share,
            None if network is None else network / share,
            r.bytes_out if j == 0 else 0,
            r.bytes_in if j == 0 else 0,
        )
        for j in range(share)
    ]
