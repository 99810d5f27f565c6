"""The scheduler: the queue of the trunk's compute, the gathering of decode batches, one computation at a time.

- Decode steps (one new position of a one-row session on the base trunk) that wait are gathered, up to
  `max_batch`, into one batched forward (`run_batch`). It waits up to `batch_wait_ms` for the sessions that are
  decoding to send their next step, and never much longer than a batch takes to compute (waiting for a straggler
  should cost at most about one step); it stops waiting as soon as all of them have.
- Everything else runs alone (a prefill chunk, a step with an adapter or of several rows, a stateless call, a
  training step), alternating with decode batches so that neither starves the other.
- One thread runs all of it. The servicer's event loop (or a worker thread) queues a piece of work and awaits its
  future; the scheduler settles the futures of what it ran, one call into each event loop for all of its own.
  The gRPC side is one asyncio loop, so no thread per session competes for the GIL (Python gRPC with a thread per
  stream carried ~2.5x one stream's messages at 64 streams, asyncio ~5.5x: scripts/bench_transport.py).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.futures import Held
from server.sessions import ServerDraining
from splitcore.device import name_os_thread

logger = logging.getLogger(__name__)

# The batched forward: (the slots of the steps, their inputs) -> each step's output, in the same order.
RunBatch = Callable[[list[int], list[Any]], Sequence[Any]]


@dataclass
class RuntimeStats:
    """Running totals of the scheduler (monitor samples and Prometheus read them)."""

    batches: int = 0  # decode batches run
    batched_rows: int = 0  # decode steps in them
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)  # rows -> batches
    jobs: int = 0  # steps run alone
    queue_wait_ms: float = 0.0  # summed over every step, batched or alone
    waited: int = 0  # steps whose wait is in queue_wait_ms
    compute_ms: float = 0.0  # summed over every forward and piece of work alone: the busy time of the device


@dataclass(eq=False, slots=True)
class Work:
    """A decode step (`slot` set, `payload` its input) or a piece of work alone (`payload` a callable)."""

    slot: int | None
    payload: Any
    fut: asyncio.Future | concurrent.futures.Future  # settled once it has run or been dropped
    arrived: float = field(default_factory=time.perf_counter)
    result: Any = None
    error: BaseException | None = None
    compute_ms: float = 0.0
    batch: int = 1  # rows of the forward it ran in


def _settle(futs: list[asyncio.Future]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


class Scheduler:
    """Queues and runs the trunk's work (see the module's docstring)."""

    def __init__(self, run_batch: RunBatch, max_batch: int, batch_wait_ms: float):
        self.run_batch, self.max_batch, self.batch_wait_s = run_batch, max_batch, batch_wait_ms / 1e3
        self.stats = RuntimeStats()
        self.on_wait: Callable[[float], None] | None = None  # told each queue wait, s (metrics)
        self._decoding: set[int] = set()  # slots whose latest step was a decode step: the batch waits for them
        self._decodes: list[Work] = []
        self._alone: collections.deque[Work] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._alone_next = False  # alternate: a decode batch, then one piece of work alone, ...
        self._step_s = self.batch_wait_s  # a recent decode batch's compute time (a moving average), s
        self._thread = threading.Thread(target=self._schedule, daemon=True, name="trunk-scheduler")
        self._thread.start()

    # --- queueing ---------------------------------------------------------------------------------------
    # An awaited piece of work runs to its end even when its awaiter is cancelled (see `Held`).
    async def decode(self, slot: int, h: Any) -> Work:
        """A decode step of the session in `slot`, batched with the other sessions'."""
        return await self._wait_async(Work(slot, h, Held(loop=asyncio.get_running_loop())))

    async def alone_async(self, fn: Callable[[], Any]) -> Work:
        return await self._wait_async(Work(None, fn, Held(loop=asyncio.get_running_loop())))

    def alone(self, fn: Callable[[], Any]) -> Work:
        """`fn` alone, from a thread that blocks until it has run."""
        w = Work(None, fn, concurrent.futures.Future())
        self._queue(w)
        w.fut.result()
        return self._outcome(w)

    async def _wait_async(self, w: Work) -> Work:
        self._queue(w)
        await w.fut  # to the end, even if the awaiter is cancelled meanwhile (see Held)
        return self._outcome(w)

    @staticmethod
    def _outcome(w: Work) -> Work:
        if w.error is not None:
            raise w.error
        return w

    def pause(self, slot: int) -> None:
        """The session in `slot` is not decoding for now (its next step runs alone, or it ended): batches do not
        wait for it."""
        with self._cv:
            self._decoding.discard(slot)

    def _queue(self, w: Work) -> None:
        with self._cv:
            if self._stopping:
                raise ServerDraining("draining: this trunk server is shutting down; retry on another replica or later")
            idle = not (self._decodes or self._alone)
            decode = w.slot is not None
            if decode:
                self._decoding.add(w.slot)
                self._decodes.append(w)
            else:
                self._alone.append(w)
            # Wake the scheduler when it waits for work, or when the batch it gathers is complete: not at every
            # arrival, which would take the GIL from the event loop that is receiving the others.
            if idle or not decode or len(self._decodes) >= self._expected():
                self._cv.notify_all()

    def stop(self) -> None:
        """Refuse new work; work queued and not yet run gets ServerDraining; the scheduler ends."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _drain(self) -> None:
        """Under the lock, stopping: fail everything queued."""
        queued = [*self._decodes, *self._alone]
        for w in queued:
            w.error = ServerDraining("the trunk server is shutting down; retry on another server or later")
        self._tell(queued)
        self._decodes, self._alone = [], collections.deque()

    @staticmethod
    def _tell(works: list[Work]) -> None:
        """The one way work is told it has run: its future settled, one call into each event loop for all of its
        own."""
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = collections.defaultdict(list)
        for w in works:
            w.payload = None  # a finished job's closure may hold a whole trainer
            if isinstance(w.fut, asyncio.Future):
                loops[w.fut.get_loop()].append(w.fut)
            else:
                w.fut.set_result(None)
        for loop, fs in loops.items():
            try:
                loop.call_soon_threadsafe(_settle, fs)
            except RuntimeError:  # the loop has closed (the server is stopping): no one awaits them
                pass

    # --- the scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> None:
        """The scheduler thread: one decode batch or one piece of work alone at a time (alternating when both
        wait), until stopped."""
        name_os_thread("trunk-scheduler")
        while True:
            with self._cv:
                while not (self._decodes or self._alone or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    self._drain()
                    return
                if self._batch_next():
                    self._gather()
                    work, self._decodes = self._decodes[: self.max_batch], self._decodes[self.max_batch :]
                else:
                    work = [self._alone.popleft()]
                self._alone_next = work[0].slot is not None
            if work[0].slot is None:
                self._run_alone(work[0])
            else:
                self._run_batch(work)
            work = None  # hold no session's tensors or results (a trainer) while idle

    def _expected(self) -> int:
        """Under the lock: how many queued decode steps make a batch complete: every decoding session's, up to
        `max_batch`."""
        return min(self.max_batch, len(self._decoding))

    def _batch_next(self) -> bool:
        """Under the lock: whether a decode batch goes next (else one piece of work alone): they alternate
        while both wait."""
        return bool(self._decodes) and not (self._alone and self._alone_next)

    def _gather(self) -> None:
        """Under the lock: wait (up to batch_wait_ms from now, when the scheduler is free to run a batch) until
        every decoding session has sent its step or the batch is full; a session decoding alone waits for no
        one. Counted from now, not from the first arrival: steps that queued while a batch ran would otherwise
        go at once, without the sessions whose answers that batch just sent, and stay out of step with them."""
        deadline = time.perf_counter() + self.gather_s()
        while len(self._decodes) < self._expected() and not self._stopping:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cv.wait(left)

    def gather_s(self) -> float:
        """How long a decode batch waits for the sessions that are decoding, at most: `batch_wait_ms`, and never
        much longer than a batch takes to compute (waiting costs at most about one step)."""
        return min(self.batch_wait_s, max(self._step_s, 0.0005))

    def _run_alone(self, w: Work) -> None:
        t0 = time.perf_counter()
        try:
            w.result = w.payload()
        except BaseException as e:  # handed to the waiter, which maps it to a status
            w.error = e
        self._finish([w], t0, batched=False)

    def _run_batch(self, batch: list[Work]) -> None:
        t0 = time.perf_counter()
        try:
            outs = self.run_batch([w.slot for w in batch], [w.payload for w in batch])
            for w, out in zip(batch, outs, strict=True):
                w.result = out
        except BaseException as e:
            logger.exception("a decode batch of %d failed", len(batch))
            for w in batch:
                w.error = e
        self._finish(batch, t0, batched=True)

    def _finish(self, works: list[Work], t0: float, batched: bool) -> None:
        """The books of a decode batch, or of a piece of work alone, run from t0; then tell its waiters."""
        ms = (time.perf_counter() - t0) * 1e3
        rows = len(works)
        waits = [t0 - w.arrived for w in works]
        with self._cv:
            s = self.stats
            if batched:
                self._step_s = 0.8 * self._step_s + 0.2 * ms / 1e3
                s.batches += 1
                s.batched_rows += rows
                s.batch_sizes[rows] += 1
            else:
                s.jobs += 1
            s.compute_ms += ms
            s.queue_wait_ms += sum(waits) * 1e3
            s.waited += rows
        if self.on_wait is not None:
            for wait in waits:
                self.on_wait(wait)
        for w in works:
            w.compute_ms, w.batch = ms, rows
        self._tell(works)
