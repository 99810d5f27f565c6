"""Generations as pieces of text, and server-sent events: a request's job, its stop sequences, several generations
merged as they come, and the event stream that closes its generations however the response ends."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio
from fastapi.responses import StreamingResponse

from frontend.api.schema import APIError
from splitcore.engine import Engine
from splitcore.generate import PromptLogprobs, TokenEvent
from splitcore.sampling import SamplingParams
from splitcore.stats import GenerationStats

logger = logging.getLogger(__name__)


# --- generation ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's generation, checked: token ids, how many new tokens, sampling, stops, log-probabilities."""

    ids: list[int]
    max_new: int
    params: SamplingParams
    stops: list[str]
    logprobs: int | None  # top alternatives per token, or None for no log-probabilities
    stats: GenerationStats = field(default_factory=GenerationStats)
    echo: str = ""  # the prompt's text, given back before the completion (completions' `echo`)
    adapter: str = ""  # the LoRA adapter the request's `model` names ("": the base model)
    user: str = ""  # the request's `user`: the split client's noise is keyed by it (one secret per user)
    prompt_lps: PromptLogprobs | None = None  # with echo and logprobs: the prompt's, filled by the prefill


@dataclass
class Piece:
    """What one generated token adds to the response: text (stop sequences held back and cut), its token, and
    why the generation ended (None while it goes on)."""

    text: str
    event: TokenEvent | None
    finish: str | None = None


class StopFilter:
    """Cuts the text at the first stop sequence. Text that could be the start of one is held back until it is
    known not to be, so a streamed response never shows part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def push(self, delta: str) -> tuple[str, bool]:
        text = self.pending + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.pending = ""
            return text[: min(cuts)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def pieces(engine: Engine, job: Job) -> Iterator[Piece]:
    """The generation as pieces (a blocking iterator: run it on a worker thread). Closing it early (a client
    gone) ends the generation and its trunk session."""
    how = {"logprobs": job.logprobs, "prompt_lps": job.prompt_lps, "adapter": job.adapter, "user": job.user}
    events = engine.stream(job.ids, job.max_new, job.params, job.stats, **how)
    stops = StopFilter(job.stops)
    eos = engine.tokenizer.eos_token_id
    try:
        for e in events:
            text, stopped = stops.push(e.text)
            if stopped:
                yield Piece(text, None, "stop")
                return
            last = e.index == job.max_new - 1 or e.token_id == eos
            if last:
                text += stops.flush()
            yield Piece(text, e, ("stop" if e.token_id == eos else "length") if last else None)
    finally:
        events.close()


def timings(stats: GenerationStats) -> dict:
    """The split's breakdown of one generation (OpenAI's clients ignore the field)."""
    tokens = stats.tokens
    out = {
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": len(tokens),
        "ttft_ms": round(stats.ttft_ms, 3),
        "tokens_per_s": round(stats.tokens_per_s, 3),
        "total_ms": round(stats.wall_s * 1e3, 3),
        "client_ms": round(sum(t.client_ms for t in tokens), 3),
    }
    if any(t.server_ms is not None for t in tokens):
        out["server_ms"] = round(sum(t.server_ms or 0.0 for t in tokens), 3)
        out["network_ms"] = round(sum(t.network_ms or 0.0 for t in tokens), 3)
    return out


async def gather(coros: list) -> list:
    """Run them at once (each generation on worker threads, so that they batch on the trunk); the first error
    cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_DONE = object()


async def merge(sources: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """The pieces of several generations as they come, each with its source's index; the first error is raised.
    Closing it early (the client gone) closes every source, which ends their generations."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, source: AsyncIterator[Piece]) -> None:
        try:
            async for p in source:
                await queue.put((i, p))
            await queue.put((i, _DONE))
        except Exception as e:  # noqa: BLE001 (raised by the reader)
            await queue.put((i, e))
        finally:
            await source.aclose()

    tasks = [asyncio.ensure_future(pump(i, source)) for i, source in enumerate(sources)]
    left = len(tasks)
    try:
        while left:
            i, item = await queue.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def chain(first, rest: AsyncIterator) -> AsyncIterator:
    if first is None:
        return
    yield first
    async for p in rest:
        yield p


def with_timings(chunk: dict, p: Piece, job: Job) -> dict:
    """The chunk that ends a stream's choice carries the generation's timings."""
    return chunk | {"timings": timings(job.stats)} if p.finish else chunk


class _EventStream(StreamingResponse):
    """A streaming response that closes its generation however the response ends: when the client goes away
    the server stops iterating the body and leaves its generators suspended, and the generation would hold its
    trunk session until they were garbage-collected."""

    def __init__(self, body: AsyncIterator[str], source: AsyncIterator[Piece]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.source = source

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.source.aclose()


def sse(chunks: AsyncIterator[dict], source: AsyncIterator[Piece]) -> StreamingResponse:
    """Server-sent events as OpenAI frames them: `data: {json}` per chunk, then `data: [DONE]`. An error after
    the stream has started goes as one `data: {"error": ...}` event (its status line is already sent).
    `source`: the generation's pieces, closed when the response ends."""

    async def frames() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            err = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
            yield f"data: {json.dumps({'error': err})}\n\n"
            return
        yield "data: [DONE]\n\n"

    return _EventStream(frames(), source)
