"""The trunk runtime: everything the trunk server computes (vLLM's engine core; TGI's router against its Batch).
The servicer decodes a request, calls `step(session, h)` and encodes the answer.

- `KVPool` (server/kvpool.py) owns every cache: a static pool of rows, one per session, and the caches of
  sessions of several rows.
- `Scheduler` (server/scheduler.py) owns the queue, the gathering of decode batches and the one way work is told
  it has run.
- `BatchedDecode` (server/batched.py) owns the batched decode forward: staging, the forward, CUDA graphs.

A step takes one of three paths: a decode step (one new position of a one-row session on the base trunk) is
batched with other sessions'; several positions, or a step through the session's adapter, run alone on its row in
chunks of `prefill_chunk` positions, with decode batches between them (a long prompt does not hold 16 decoding
sessions back for its whole length); a session of several rows runs alone on a cache of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from server.batched import BatchedDecode
from server.kvpool import KVPool
from server.scheduler import RuntimeStats, Scheduler
from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2

__all__ = ["RuntimeStats", "TrunkRuntime"]


class TrunkRuntime:
    """The KV pool, the scheduler and the batched forward of one trunk (see the module's docstring)."""

    def __init__(
        self,
        trunk: GPT2,
        slots: int,
        max_length: int,
        max_batch: int = 32,
        batch_wait_ms: float = 5.0,
        prefill_chunk: int = 128,
        graphs: bool = False,
    ):
        if min(slots, max_batch, max_length, prefill_chunk) < 1 or batch_wait_ms < 0:
            raise InvalidInput(
                f"need --kv-slots, --max-batch and --prefill-chunk >= 1 and --batch-wait-ms >= 0; "
                f"got {slots}, {max_batch}, {prefill_chunk}, {batch_wait_ms}"
            )
        self.trunk, self.prefill_chunk = trunk, prefill_chunk
        self.pool = KVPool(trunk, slots, max_length)
        self.decode_batch = BatchedDecode(self.pool, graphs)
        self.scheduler = Scheduler(self.decode_batch, max_batch, batch_wait_ms)
        self.stats: RuntimeStats = self.scheduler.stats

    @property
    def slots(self) -> int:
        return self.pool.slots

    @property
    def max_length(self) -> int:
        """A session's tokens at most (the pool's rows hold one more: a spare)."""
        return self.pool.max_length

    # --- sessions ---------------------------------------------------------------------------------------
    def acquire_slot(self) -> int:
        return self.pool.acquire()

    def release_slot(self, slot: int) -> None:
        """Give a session's slot back; called when nothing of its session is queued or running any more."""
        self.scheduler.pause(slot)
        self.pool.release(slot)

    def used_slots(self) -> int:
        return self.pool.used()

    @property
    def slot_bytes(self) -> int:
        return self.pool.slot_bytes

    # --- steps ------------------------------------------------------------------------------------------
    async def step(self, session, h: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, float, int]:
        """The trunk's output for a step of `session` (its slot, adapter `model` and rows `batch`) with hidden
        states `h` (B, T, C): (output on the CPU, compute ms, rows of the forward it ran in). `h` is what the
        servicer decoded: a float32/float16 array, or a tensor. A decode step's output comes as a numpy array
        where the trunk's dtype has one."""
        if session.rows is None:
            session.rows = h.shape[0]
        elif h.shape[0] != session.rows:
            raise InvalidInput(f"batch size changed from {session.rows} to {h.shape[0]} within a session")
        if session.rows == 1 and h.shape[1] == 1 and session.model is None:
            return await self.decode_async(session.slot, h)
        h = torch.from_numpy(h.copy()) if isinstance(h, np.ndarray) else h  # the array is a view of the message
        if session.rows == 1:  # the session's row of the pool
            out, ms = await self.prefill_async(session.slot, h, session.model)
            return out, ms, 1
        cache = self.pool.rows_cache(session.slot, session.rows, session.max_length)
        model = session.model or self.trunk

        def several_rows():
            with torch.inference_mode():
                return model(h, cache).cpu()

        out, ms = await self.run_timed_async(several_rows)
        return out, ms, 1

    async def decode_async(self, slot: int, h: np.ndarray | torch.Tensor) -> tuple[Any, float, int]:
        """One new position for the one-row session in `slot` (h: (1, 1, C)), batched with the other sessions':
        (output (1, 1, C), the batch's compute ms, its rows)."""
        w = await self.scheduler.decode(slot, h)
        return w.result, w.compute_ms, w.batch

    async def prefill_async(self, slot: int, h: torch.Tensor, model: GPT2 | None = None) -> tuple[torch.Tensor, float]:
        """Several new positions (or a step with an adapter's `model`) for the session in `slot`, alone, in chunks
        of `prefill_chunk` positions with decode batches between them: ((1, T, C) on the CPU, compute ms)."""
        self.scheduler.pause(slot)
        model, cache = model or self.trunk, self.pool.cache

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(chunk, cache, row=slot).cpu()

        done = [await self.run_timed_async(functools.partial(forward, c)) for c in h.split(self.prefill_chunk, 1)]
        outs = [out for out, _ in done]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), sum(ms for _, ms in done)

    def run_timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn` alone, between decode batches, from a thread that waits for it: (what it returns, compute ms)."""
        w = self.scheduler.alone(fn)
        return w.result, w.compute_ms

    async def run_timed_async(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        w = await self.scheduler.alone_async(fn)
        return w.result, w.compute_ms

    def stop(self) -> None:
        """Refuse new work; work queued and not yet run gets ServerDraining."""
        self.scheduler.stop()
