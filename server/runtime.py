"""The trunk runtime: everything the trunk server computes. The servicer decodes a request, hands it here and
encodes the answer (Petals' handler against its block functions; TGI's router against its Batch).

- **KV slots.** One static cache of `slots` rows x (`max_length` + 1) positions is allocated at start. A
  session takes a row when it opens and gives it back when it ends (closed, cancelled, reaped). The last
  position of every row is a spare that nothing reads.
- **One computation at a time, batched.** Decode steps (one new position of a one-row session on the base
  trunk) that wait are gathered, up to `max_batch`, into one forward over rows at different positions:
  rows [0, N) of the pool, where N is one past the highest slot taking part; a row that sits the step out
  writes to its spare position and its output is dropped. Decode is bound by weight reads, so N rows cost
  little more than one. The scheduler waits up to `batch_wait_ms` for the sessions that are decoding to send
  their next step, and never much longer than a batch takes to compute (waiting for a straggler should cost
  at most about one step); it stops waiting as soon as all of them have.
- **Everything else runs alone** (a prefill chunk, a step with an adapter or of several rows, a stateless call,
  a training step), alternating with decode batches so that neither starves the other.
- **A scheduler thread** runs all of it. The servicer's event loop (or a caller's thread) queues a piece of work
  and awaits it; the scheduler gathers, computes, and answers each piece. The gRPC side is one asyncio loop, so
  no thread per session competes for the GIL (Python gRPC with a thread per stream carried ~2.5x one stream's
  messages at 64 streams, asyncio ~5.5x: scripts/bench_transport.py). Prefills go in chunks of
  `prefill_chunk` tokens: a long prompt does not hold 16 decoding sessions back for its whole length.
- **CUDA graphs** per (batch-size bucket, key-range bucket), captured at start over the pool's first rows.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.futures import Held
from server.sessions import ServerDraining
from splitcore.cudagraph import MIN_BUCKET, capture
from splitcore.device import name_os_thread
from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.gpt2 import GPT2

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = (torch.float32, torch.float16)  # what a batch's inputs are staged in with numpy


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
class _Work:
    slots: list[int] | None  # the slot of a decode step (a list of one); None for work that runs alone
    payload: Any  # the hidden states (1, 1, C) of the step, or the callable of work that runs alone
    arrived: float = field(default_factory=time.perf_counter)
    done: Callable[[], None] | None = None  # a thread's: told once it has run or been dropped
    fut: asyncio.Future | None = None  # or an event loop's: settled then, on its loop
    result: Any = None  # a decode step's output (1, 1, C)
    error: BaseException | None = None
    compute_ms: float = 0.0
    batch: int = 1  # rows of the forward it ran in


def _settle(futs: list[asyncio.Future]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


def _buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit`."""
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def _bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class _RowsGraph:
    """decode_rows over the pool's first `rows` rows and keys [0, end), captured once as a CUDA graph, with the copies
    of its inputs from the runtime's pinned host buffers: a replay is one call (each torch call lets go of the GIL,
    and may wait for the event loop to give it back)."""

    def __init__(self, model: GPT2, cache, x_host: torch.Tensor, pos_host: torch.Tensor, rows: int, end: int, pool):
        self.x = torch.zeros(rows, 1, model.config.n_embd, device=model.device, dtype=model.dtype)
        self.positions = torch.zeros(rows, dtype=torch.long, device=model.device)

        def step() -> torch.Tensor:  # the host buffers hold every row's spare position while capturing
            self.x.copy_(x_host[:rows], non_blocking=True)  # from pinned memory: a copy node of the graph
            self.positions.copy_(pos_host[:rows], non_blocking=True)
            return model.decode_rows(self.x, cache, self.positions, end)

        self.graph, self.out = capture(step, model.device, pool)  # warming up, every row writes to its spare

    def run(self) -> torch.Tensor:
        """Replay over what the host buffers hold now; they must not change until the output has been read."""
        self.graph.replay()
        return self.out


class TrunkRuntime:
    """KV slots and the scheduling of one trunk's compute (see the module's docstring)."""

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
        self.trunk, self.slots, self.max_length = trunk, slots, max_length
        self.max_batch, self.batch_wait_s, self.prefill_chunk = max_batch, batch_wait_ms / 1e3, prefill_chunk
        self.cache = trunk.new_cache(max_length + 1, rows=slots, static=True)
        self.spare = max_length  # the position a row writes to when it sits a batched step out
        pin = trunk.device.type == "cuda"  # a batch's inputs go to the device from pinned host buffers
        self._x_host = torch.zeros(slots, 1, trunk.config.n_embd, dtype=trunk.dtype, pin_memory=pin)
        self._pos_host = torch.full((slots,), self.spare, dtype=torch.long, pin_memory=pin)
        self._x_np = self._x_host.numpy() if trunk.dtype in _NUMPY_DTYPES else None
        self._pos_np = self._pos_host.numpy()
        self.stats = RuntimeStats()
        self.on_wait: Callable[[float], None] | None = None  # told each queue wait, s (metrics)
        self._free = list(range(slots))  # a heap: the lowest free slot first, so batches stay short
        self._decoding: set[int] = set()  # slots whose latest step was a decode step: the batch waits for them
        self._decodes: list[_Work] = []
        self._alone: collections.deque[_Work] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._alone_next = False  # alternate: a decode batch, then one piece of work alone, ...
        self._step_s = self.batch_wait_s  # a recent decode batch's compute time (a moving average), s
        self._row_buckets = _buckets(slots)
        self._end_buckets = (
            _buckets(self.cache.capacity, MIN_BUCKET) if self.cache.capacity > MIN_BUCKET else [self.cache.capacity]
        )
        self._graphs: dict[tuple[int, int], _RowsGraph] = {}
        if graphs and trunk.device.type == "cuda":
            self._capture()
        self._thread = threading.Thread(target=self._schedule, daemon=True, name="trunk-scheduler")
        self._thread.start()

    # --- slots ------------------------------------------------------------------------------------------
    @property
    def slot_bytes(self) -> int:
        return self.cache.nbytes() // self.slots

    def used_slots(self) -> int:
        with self._cv:
            return self.slots - len(self._free)

    def acquire_slot(self) -> int:
        with self._cv:
            if not self._free:
                raise LimitExceeded(
                    f"no free KV slot: all {self.slots} are in use (the server's limit, --kv-slots, is {self.slots})"
                )
            return heapq.heappop(self._free)

    def release_slot(self, slot: int) -> None:
        """Give a slot back, emptied and zeroed as far as its session wrote (nothing of one session may reach the
        next: see KVCache.zero); called when nothing of its session is queued or running any more."""
        with self._cv:
            self.cache.zero(slot)
            self._decoding.discard(slot)
            heapq.heappush(self._free, slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll the slot back to `length` positions (from its session's handler, nothing of it in flight)."""
        with self._cv:
            self.cache.truncate(length, row=slot)

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    # --- work -------------------------------------------------------------------------------------------
    # Work is awaited on the servicer's event loop; `run_timed` also blocks a worker thread (stateless calls and
    # training steps run there). An awaited piece of work runs to its end even when its awaiter is cancelled (see
    # `Held`).
    async def decode_async(
        self, slot: int, h: torch.Tensor | np.ndarray
    ) -> tuple[np.ndarray | torch.Tensor, float, int]:
        """One new position for the one-row session in `slot` (h: (1, 1, C), a tensor or a float32/float16 array),
        batched with the other sessions'. Returns the trunk's output (1, 1, C) as the batch left it (a numpy array
        for a float32 or float16 trunk, what the servicer encodes with numpy; else a tensor), and the compute ms
        and rows of the batch it ran in."""
        w = await self._wait_async(_Work([slot], h), decode=True)
        return w.result, w.compute_ms, w.batch

    def _chunks(self, slot: int, h: torch.Tensor, model: GPT2 | None) -> list[Callable[[], torch.Tensor]]:
        with self._cv:
            self._decoding.discard(slot)  # not decoding for now: batches do not wait for it
        model = model or self.trunk

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(chunk, self.cache, row=slot).cpu()

        return [functools.partial(forward, c) for c in h.split(self.prefill_chunk, dim=1)]

    @staticmethod
    def _joined(done: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float]:
        outs = [out for out, _ in done]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), sum(ms for _, ms in done)

    async def prefill_async(self, slot: int, h: torch.Tensor, model: GPT2 | None = None) -> tuple[torch.Tensor, float]:
        """Several new positions (or a step with an adapter's `model`) for the session in `slot`, alone, in chunks
        of `prefill_chunk` positions with decode batches between them. Returns (1, T, C) on the CPU, and the
        compute ms."""
        return self._joined([await self.run_timed_async(f) for f in self._chunks(slot, h, model)])

    def run_timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn` alone, between decode batches, one computation at a time: (what it returns, compute ms)."""
        w = self._wait(_Work(None, fn), decode=False)
        return w.result, w.compute_ms

    async def run_timed_async(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        w = await self._wait_async(_Work(None, fn), decode=False)
        return w.result, w.compute_ms

    def _wait(self, w: _Work, decode: bool) -> _Work:
        ran = threading.Event()
        w.done = ran.set
        self._queue(w, decode)
        ran.wait()
        return self._outcome(w)

    async def _wait_async(self, w: _Work, decode: bool) -> _Work:
        w.fut = Held(loop=asyncio.get_running_loop())
        self._queue(w, decode)
        await w.fut  # to the end, even if the awaiter is cancelled meanwhile (see Held)
        return self._outcome(w)

    @staticmethod
    def _outcome(w: _Work) -> _Work:
        if w.error is not None:
            raise w.error
        return w

    def _queue(self, w: _Work, decode: bool) -> None:
        with self._cv:
            if self._stopping:
                raise ServerDraining("draining: this trunk server is shutting down; retry on another replica or later")
            idle = not (self._decodes or self._alone)
            if decode:
                self._decoding.update(w.slots)
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
    def _tell(works: list[_Work]) -> None:
        """Tell the waiters of `works` that they have run: one call into each event loop for all of its own."""
        futs: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = collections.defaultdict(list)
        for w in works:
            w.payload = None  # a finished job's closure may hold a whole trainer
            if w.fut is not None:
                futs[w.fut.get_loop()].append(w.fut)
            else:
                w.done()
        for loop, fs in futs.items():
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
                self._alone_next = work[0].slots is not None
            self._run(work)
            work = None  # hold no session's tensors or results (a trainer) while idle

    def _run(self, work: list[_Work]) -> None:
        if work[0].slots is None:
            self._run_alone(work[0])
        else:
            self._run_batch(work)

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

    def _run_alone(self, w: _Work) -> None:
        t0 = time.perf_counter()
        try:
            w.result = w.payload()
        except BaseException as e:  # handed to the waiting thread, which maps it to a status
            w.error = e
        self._finish([w], t0, None)

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Work]) -> None:
        t0 = time.perf_counter()
        slots = [s for w in batch for s in w.slots]
        try:
            out = self._forward(batch, slots)
            rows = out.numpy() if out.dtype in _NUMPY_DTYPES else out  # numpy indexing: a fraction of torch's
            lengths = self.cache.lengths
            for s in slots:
                lengths[s] += 1
            for w in batch:  # a view of the step's row
                w.result = rows[w.slots[0] : w.slots[0] + 1]
        except BaseException as e:
            logger.exception("a decode batch of %d failed", len(slots))
            for w in batch:
                w.error = e
        self._finish(batch, t0, slots)

    def _forward(self, batch: list[_Work], slots: list[int]) -> torch.Tensor:
        """One forward over rows [0, N) of the pool for `slots`, the slots of `batch`; (N, 1, C) on the CPU."""
        lengths = self.cache.lengths
        n = max(slots) + 1
        held = [lengths[s] for s in slots]
        end = max(held) + 1
        if end > self.max_length:
            full = slots[held.index(end - 1)]
            raise LimitExceeded(f"slot {full} is full ({self.max_length} positions)")
        graph = None
        if self._graphs:
            n = _bucket(n, self._row_buckets)
            end = _bucket(end, self._end_buckets)
            graph = self._graphs.get((n, end))
        x, positions = self._stage(batch, n, slots, held)
        if graph is not None:
            out = graph.run()  # its first nodes copy the host buffers in
        else:
            device = self.trunk.device
            x, positions = x.to(device, non_blocking=True), positions.to(device, non_blocking=True)
            out = self.trunk.decode_rows(x, self.cache, positions, end)
        return out.cpu()  # one copy for the whole batch (and the syncs that frees the host buffers again)

    def _stage(self, batch: list[_Work], n: int, slots: list[int], held: list[int]) -> tuple[torch.Tensor, ...]:
        """The batch's inputs and positions (its `slots` hold `held` positions) in the host buffers
        (pinned on a GPU), rows [0, N): numpy writes, one for each step, a fraction of the cost of torch calls (a
        forward's fixed cost is the scheduler's own time on the GIL). A row that sits the step out keeps an old
        input and writes to its spare position."""
        pos = self._pos_np
        pos[:n] = self.spare
        pos[slots] = held
        for w in batch:
            p = w.payload  # (1, 1, C): a tensor, or a float32/float16 array as the servicer decoded it
            if isinstance(p, torch.Tensor) and p.dtype in _NUMPY_DTYPES and p.device.type == "cpu":
                p = p.numpy()
            if self._x_np is not None and isinstance(p, np.ndarray):
                self._x_np[w.slots[0]] = p[0]
            else:  # bfloat16 on either side (numpy has none), or already on the device
                self._x_host[w.slots[0]].copy_(torch.as_tensor(p[0]))
        return self._x_host[:n], self._pos_host[:n]

    def _finish(self, works: list[_Work], t0: float, slots: list[int] | None) -> None:
        """The books of a decode batch over `slots`, or of a piece of work alone (None), run from t0."""
        ms = (time.perf_counter() - t0) * 1e3
        rows = 1 if slots is None else len(slots)
        waits = [t0 - w.arrived for w in works]
        with self._cv:
            s = self.stats
            if slots is not None:
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

    # --- CUDA graphs ------------------------------------------------------------------------------------
    def _capture(self) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
                for n in self._row_buckets:
                    for end in self._end_buckets:
                        self._graphs[(n, end)] = _RowsGraph(
                            self.trunk, self.cache, self._x_host, self._pos_host, n, end, pool
                        )
        except Exception as e:  # an optimisation: say why once, then batch eagerly
            logger.warning("CUDA graph capture of batched decode failed (%s: %s); running eagerly", type(e).__name__, e)
            self._graphs.clear()
        finally:
            self.cache.reset()
        if self._graphs:
            logger.info(
                "captured %d CUDA graphs of batched decode (rows %s x keys %s) in %.1f s",
                len(self._graphs),
                self._row_buckets,
                self._end_buckets,
                time.perf_counter() - t0,
            )
