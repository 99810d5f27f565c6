"""Decode steps as CUDA graphs: a thin capture-and-replay layer over GPT2.decode_static.

A StaticDecoder owns a static KV cache (its buffers never move) and one static input buffer. On CUDA it
captures `decode_static` once and then replays it: one launch per token instead of ~15 per block. Anywhere
else, or where capture fails (one log line), `step` runs the very same static step eagerly; that is the path
the CPU tests check against the dynamic one. Prefill runs eagerly into the same cache (`decoder.cache`).

A DecoderPool keeps idle decoders per capacity bucket, so a new generation or session reuses a captured graph
instead of capturing again. Used by the steppers (full model, client bottom and top, in-process trunk); the trunk
server captures its batched decode per bucket with the same `capture` (server/runtime.py).
"""

from __future__ import annotations

import logging
import threading

import torch

from splitcore.errors import LimitExceeded
from splitcore.gpt2 import GPT2

logger = logging.getLogger(__name__)

MIN_BUCKET = 64  # smallest capacity captured; buckets double up to the model's context
_CAPTURE = threading.Lock()  # one capture at a time in a process


def capture(step, device: torch.device, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`step()` warmed up twice on a side stream (lazy init, kernel choice, the allocator), then captured as a
    CUDA graph: (the graph, its output buffer). One capture at a time in a process; other threads may decode
    meanwhile (thread-local capture). Raises what capture raises: the callers fall back to eager steps. Used by
    StaticDecoder and by the trunk server's batched decode (server/runtime.py)."""
    with _CAPTURE:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = step()
    return graph, out


def bucket(length: int, n_positions: int) -> int:
    """The capacity a generation of `length` tokens decodes in: a power of two >= MIN_BUCKET, at most the
    context. Few buckets = few graphs; attention over unused room is masked and costs little on a GPU."""
    cap = MIN_BUCKET
    while cap < length:
        cap *= 2
    return min(cap, n_positions)


class StaticDecoder:
    """One-position decode steps of `model` over a static cache of `rows` rows x `capacity` positions."""

    def __init__(self, model: GPT2, capacity: int, rows: int = 1, graphs: bool = True):
        self.model, self.capacity, self.rows = model, capacity, rows
        self.cache = model.new_cache(capacity, rows, static=True)
        if model.has_embed:
            self.x = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        else:
            self.x = torch.zeros(rows, 1, model.config.n_embd, dtype=model.dtype, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if graphs and model.device.type == "cuda":
            self._capture()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    @torch.inference_mode()
    def _capture(self) -> None:
        try:
            self.graph, self.out = capture(lambda: self.model.decode_static(self.x, self.cache), self.model.device)
        except Exception as e:  # capture is an optimisation: say why once, then decode eagerly
            logger.warning(
                "CUDA graph capture failed for blocks %d-%d (%s: %s); decoding eagerly",
                self.model.layers.start,
                self.model.layers.stop - 1,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            self.graph, self.out = None, None
        finally:
            self.cache.positions.zero_()  # warm-up wrote at position 0 of each row: as good as empty
            self.cache.reset()

    @torch.inference_mode()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One new position per row: x is (rows, 1) token ids or (rows, 1, C) hidden states. Returns logits
        (rows, vocab) or hidden states (rows, 1, C), the caller's to keep (a graph's output buffer is copied:
        the next replay overwrites it, and a link may keep what it sent for a replay after a trunk restart)."""
        if max(self.cache.lengths) + 1 > self.capacity:
            raise LimitExceeded(f"decode past this cache's fixed room of {self.capacity} positions")
        self.cache.device_positions()  # refresh after eager prefill steps
        if self.graph is None:
            out = self.model.decode_static(x.to(self.x.device, self.x.dtype), self.cache)
        else:
            self.x.copy_(x, non_blocking=True)
            self.graph.replay()
            out = self.out.clone()
        self.cache.count_static_step()
        return out


class DecoderPool:
    """Idle StaticDecoders of one model per capacity bucket, reused across generations or sessions."""

    def __init__(self, model: GPT2, graphs: bool = True, max_idle: int = 4):
        self.model, self.graphs, self.max_idle = model, graphs, max_idle
        self._idle: dict[tuple[int, int], list[StaticDecoder]] = {}
        self._lock = threading.Lock()
        self.captured = 0  # decoders built (each a capture on CUDA)

    def acquire(self, length: int, rows: int = 1) -> StaticDecoder:
        """A decoder with an empty cache of room for at least `length` positions."""
        key = (bucket(length, self.model.n_positions), rows)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
            self.captured += 1
        return StaticDecoder(self.model, key[0], rows, self.graphs)

    def warm(self, rows: int = 1) -> int:
        """Build (capture) one idle decoder per capacity bucket now, so that no generation pays for a capture
        in its time to first token. Returns how many were built."""
        built, cap = [], MIN_BUCKET
        while True:
            built.append(self.acquire(cap, rows))
            if cap >= self.model.n_positions:
                break
            cap *= 2
        for d in built:
            self.release(d)
        return len(built)

    @classmethod
    def warmed(cls, model: GPT2, max_idle: int = 4) -> DecoderPool:
        """A pool with every capacity bucket captured already: what an engine or a server builds at start."""
        pool = cls(model, max_idle=max_idle)
        pool.warm()
        return pool

    def release(self, decoder: StaticDecoder) -> None:
        """Give a decoder back once nothing runs on it any more; its cache is emptied."""
        decoder.cache.reset()
        with self._lock:
            idle = self._idle.setdefault((decoder.capacity, decoder.rows), [])
            if len(idle) < self.max_idle:
                idle.append(decoder)
