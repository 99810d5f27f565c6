"""The KV pool: every key and value the trunk server keeps between a session's steps.

One static cache of `slots` rows x (`max_length` + 1) positions is allocated at start. A session takes a row (a
slot) when it opens and gives it back when its stream ends (closed, cancelled, reaped); the row is zeroed then, so
nothing of one session reaches the next. The last position of every row is a spare that nothing reads: a row that
sits a batched decode step out writes there. A session of several rows (one request carrying a batch) gets a cache
of its own at its first step, held under its slot and dropped with it."""

from __future__ import annotations

import heapq
import threading

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.gpt2 import GPT2
from splitcore.kvcache import KVCache


class KVPool:
    """The trunk's KV rows (see the module's docstring). Slot calls come from a session's own handler, with
    nothing of that session queued or running."""

    def __init__(self, trunk: GPT2, slots: int, max_length: int):
        self.trunk, self.slots, self.max_length = trunk, slots, max_length
        self.cache = trunk.new_cache(max_length + 1, rows=slots, static=True)
        self.spare = max_length  # the position a row writes to when it sits a batched step out
        self._free = list(range(slots))  # a heap: the lowest free slot first, so batches stay short
        self._rows: dict[int, KVCache] = {}  # slot -> the cache of a session of several rows
        self._lock = threading.Lock()

    @property
    def slot_bytes(self) -> int:
        return self.cache.nbytes() // self.slots

    def used(self) -> int:
        with self._lock:
            return self.slots - len(self._free)

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise LimitExceeded(
                    f"no free KV slot: all {self.slots} are in use (the server's limit, --kv-slots, is {self.slots})"
                )
            return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        """Give a slot back, zeroed as far as its session wrote (see KVCache.zero), with its own cache if any."""
        with self._lock:
            self.cache.zero(slot)
            self._rows.pop(slot, None)
            heapq.heappush(self._free, slot)

    def rows_cache(self, slot: int, rows: int, max_length: int) -> KVCache:
        """The cache of the session in `slot` that sends `rows` rows a step, made at its first step."""
        cache = self._rows.get(slot)
        if cache is None:
            cache = self._rows[slot] = self.trunk.new_cache(max_length, rows=rows)
        return cache

    def length(self, slot: int) -> int:
        own = self._rows.get(slot)
        return self.cache.lengths[slot] if own is None else own.length

    def truncate(self, slot: int, length: int) -> None:
        """Forget the session's positions from `length` on."""
        held = self.length(slot)
        if not 0 <= length <= held:
            raise InvalidInput(f"cannot truncate to {length} positions: the session holds {held}")
        own = self._rows.get(slot)
        if own is not None:
            own.truncate(length)
        elif length < held:
            self.cache.truncate(length, row=slot)
