"""The batched decode forward: the decode steps of several sessions, each at its own position, as one forward over
rows [0, N) of the KV pool, where N is one past the highest slot taking part. A row that sits the step out writes
to its spare position and its output is dropped. Decode is bound by weight reads, so N rows cost little more
than one.

Its inputs are staged in host buffers (pinned on a GPU) with numpy: one write a step, a fraction of the cost of
torch calls (a forward's fixed cost is the scheduler's own time on the GIL). On a GPU, CUDA graphs per
(batch-size bucket, key-range bucket) are captured at start over the pool's first rows."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from server.kvpool import KVPool
from splitcomm.codec import NUMPY_FLOATS
from splitcore.cudagraph import MIN_BUCKET, capture
from splitcore.errors import LimitExceeded
from splitcore.gpt2 import GPT2

logger = logging.getLogger(__name__)


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
    of its inputs from the pinned host buffers: a replay is one call (each torch call lets go of the GIL, and may
    wait for the event loop to give it back)."""

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


class BatchedDecode:
    """Decode steps of one-row sessions over the pool's rows, as one forward (see the module's docstring)."""

    def __init__(self, pool: KVPool, graphs: bool = False):
        self.pool, self.trunk = pool, pool.trunk
        trunk, slots = pool.trunk, pool.slots
        pin = trunk.device.type == "cuda"
        self._x_host = torch.zeros(slots, 1, trunk.config.n_embd, dtype=trunk.dtype, pin_memory=pin)
        self._pos_host = torch.full((slots,), pool.spare, dtype=torch.long, pin_memory=pin)
        self._x_np = self._x_host.numpy() if trunk.dtype in NUMPY_FLOATS else None
        self._pos_np = self._pos_host.numpy()
        capacity = pool.cache.capacity
        self._row_buckets = _buckets(slots)
        self._end_buckets = _buckets(capacity, MIN_BUCKET) if capacity > MIN_BUCKET else [capacity]
        self.graphs: dict[tuple[int, int], _RowsGraph] = {}
        if graphs and trunk.device.type == "cuda":
            self._capture()

    @torch.inference_mode()
    def __call__(self, slots: list[int], inputs: list[Any]) -> list[np.ndarray | torch.Tensor]:
        """One new position for each of `slots`, whose inputs (1, 1, C) are float32/float16 arrays as the servicer
        decoded them, or tensors (bfloat16, which numpy lacks). Each output (1, 1, C) is a view of the batch's
        CPU rows: a numpy array where the trunk's dtype has one (what the servicer encodes), else a tensor."""
        out = self._forward(slots, inputs)
        rows = out.numpy() if out.dtype in NUMPY_FLOATS else out  # numpy indexing: a fraction of torch's
        lengths = self.pool.cache.lengths
        for s in slots:
            lengths[s] += 1
        return [rows[s : s + 1] for s in slots]

    def _forward(self, slots: list[int], inputs: list[Any]) -> torch.Tensor:
        """One forward over rows [0, N) of the pool; (N, 1, C) on the CPU."""
        cache = self.pool.cache
        n = max(slots) + 1
        held = [cache.lengths[s] for s in slots]
        end = max(held) + 1
        if end > self.pool.max_length:
            full = slots[held.index(end - 1)]
            raise LimitExceeded(f"slot {full} is full ({self.pool.max_length} positions)")
        graph = None
        if self.graphs:
            n = _bucket(n, self._row_buckets)
            end = _bucket(end, self._end_buckets)
            graph = self.graphs.get((n, end))
        x, positions = self._stage(n, slots, held, inputs)
        if graph is not None:
            out = graph.run()  # its first nodes copy the host buffers in
        else:
            device = self.trunk.device
            x, positions = x.to(device, non_blocking=True), positions.to(device, non_blocking=True)
            out = self.trunk.decode_rows(x, cache, positions, end)
        return out.cpu()  # one copy for the whole batch (and the syncs that frees the host buffers again)

    def _stage(self, n: int, slots: list[int], held: list[int], inputs: list[Any]) -> tuple[torch.Tensor, ...]:
        """The inputs and positions (`slots` hold `held` positions) in the host buffers, rows [0, N). A row that
        sits the step out keeps an old input and writes to its spare position."""
        pos = self._pos_np
        pos[:n] = self.pool.spare
        pos[slots] = held
        for s, x in zip(slots, inputs, strict=True):
            if self._x_np is not None and isinstance(x, np.ndarray):
                self._x_np[s] = x[0]
            else:  # bfloat16 on either side (numpy has none)
                self._x_host[s].copy_(torch.as_tensor(x[0]))
        return self._x_host[:n], self._pos_host[:n]

    def _capture(self) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                mem = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
                for n in self._row_buckets:
                    for end in self._end_buckets:
                        self.graphs[(n, end)] = _RowsGraph(
                            self.trunk, self.pool.cache, self._x_host, self._pos_host, n, end, mem
                        )
        except Exception as e:  # an optimisation: say why once, then batch eagerly
            logger.warning("CUDA graph capture of batched decode failed (%s: %s); running eagerly", type(e).__name__, e)
            self.graphs.clear()
        finally:
            self.pool.cache.reset()
        if self.graphs:
            logger.info(
                "captured %d CUDA graphs of batched decode (rows %s x keys %s) in %.1f s",
                len(self.graphs),
                self._row_buckets,
                self._end_buckets,
                time.perf_counter() - t0,
            )
