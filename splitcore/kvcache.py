"""The KV cache of a run of GPT-2 blocks: rows x heads x positions x head_dim per block, a length per row.

One cache belongs to one part (the full model, the bottom, the trunk or the top) and holds every block of it.
Rows are sessions or batch rows, each at its own position. The buffers have room fixed ahead (`capacity`):
new positions are written in place, never concatenated. A cache built with `growable=True` doubles its room
when a write would pass it; a static one (for CUDA graphs, whose buffers must never move) refuses instead.

Lengths live twice: as Python ints (`lengths`, read by the host without a device sync) and as a device tensor
(`positions`, read by the static-shape decode step inside a CUDA graph). Eager steps keep the ints and mark the
tensor stale; the static step refreshes it once, then advances both.
"""

from __future__ import annotations

import torch

from splitcore.errors import InvalidInput, LimitExceeded

MIN_ROOM = 64  # positions allocated at least, when the caller gives no length


class KVCache:
    """Keys and values of `n_blocks` blocks, `rows` rows each, with room for `capacity` positions."""

    def __init__(
        self,
        n_blocks: int,
        rows: int,
        n_head: int,
        head_dim: int,
        capacity: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        growable: bool = True,
        max_positions: int | None = None,
    ):
        if rows < 1:
            raise InvalidInput(f"a KV cache needs at least one row, got {rows}")
        self.n_blocks, self.rows, self.n_head, self.head_dim = n_blocks, rows, n_head, head_dim
        self.device, self.dtype, self.growable = torch.device(device), dtype, growable
        self.max_positions = max_positions  # the model's context; None = no limit here
        room = capacity if capacity > 0 else (MIN_ROOM if growable else 0)
        if room < 1:
            raise InvalidInput("a static KV cache needs a capacity of at least one position")
        self.k = [self._alloc(room) for _ in range(n_blocks)]  # each (rows, heads, room, head_dim)
        self.v = [self._alloc(room) for _ in range(n_blocks)]
        self.lengths = [0] * rows  # filled positions per row, on the host
        self.written = [0] * rows  # per row, the most positions it held before its latest truncation
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)  # the same, on the device
        self._positions_stale = False

    def _alloc(self, room: int) -> torch.Tensor:
        return torch.zeros(self.rows, self.n_head, room, self.head_dim, device=self.device, dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def length(self) -> int:
        """Filled positions of row 0: the length of a one-row cache (a session, a generation)."""
        return self.lengths[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # --- room ---------------------------------------------------------------------------------------
    def reserve(self, end: int) -> None:
        """Make room for positions [0, end): grow (a growable cache) or refuse (a static one)."""
        if self.max_positions is not None and end > self.max_positions:
            raise LimitExceeded(f"sequence of {end} tokens is past the model's context of {self.max_positions}")
        if end <= self.capacity:
            return
        if not self.growable:
            raise LimitExceeded(f"sequence of {end} tokens is past this cache's fixed room of {self.capacity}")
        room = max(end, 2 * self.capacity)
        if self.max_positions is not None:
            room = min(room, self.max_positions)
        for blocks in (self.k, self.v):
            for i, old in enumerate(blocks):
                new = self._alloc(room)
                new[:, :, : old.shape[2]] = old
                blocks[i] = new

    def truncate(self, length: int, row: int | None = None) -> None:
        """Forget every position from `length` on (one row, or all): as if they had never been written."""
        rows = range(self.rows) if row is None else [row]
        for r in rows:
            if not 0 <= length <= self.lengths[r]:
                raise InvalidInput(f"cannot truncate row {r} to {length}: it holds {self.lengths[r]} positions")
            self.written[r] = max(self.written[r], self.lengths[r])
            self.lengths[r] = length
        self._positions_stale = True

    def reset(self) -> None:
        self.truncate(0)

    def zero(self, row: int) -> None:
        """Empty `row` and overwrite with zeros every position it ever held, in every block. For a row that passes
        from one user to another: a key past a row's length is masked out of its attention, but its value is
        still multiplied by the zero weight, and a NaN left there (from a sender's absurd input) times zero is
        NaN."""
        end = max(self.written[row], self.lengths[row])
        for t in (*self.k, *self.v):
            t[row, :, :end].zero_()
        self.lengths[row] = self.written[row] = 0
        self._positions_stale = True

    # --- eager writes -------------------------------------------------------------------------------
    def start(self, row: int | None, t: int) -> tuple[list[int], int]:
        """Before an eager step of `t` new positions on `row` (None: every row): check the room
        and return (past length of each row taking part, key length L the attention reads)."""
        past = self.lengths if row is None else [self.lengths[row]]
        end = max(past) + t
        self.reserve(end)
        return past, end

    def write(self, kv_index: int, k, v, row: int | None, start: int | None, positions, end: int):
        """Write block `kv_index`'s new keys/values (B, heads, T, head_dim): from `start` in every row, or, for rows at
        different places, at `positions` (B, T). Returns the views (B, heads, end, head_dim) the attention reads."""
        kb, vb = self.k[kv_index], self.v[kv_index]
        if row is not None:
            kb, vb = kb[row : row + 1], vb[row : row + 1]
        if start is not None:  # every row at the same position: a plain slice
            kb[:, :, start : start + k.shape[2]] = k
            vb[:, :, start : start + k.shape[2]] = v
        else:
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            kb.scatter_(2, idx, k)
            vb.scatter_(2, idx, v)
        return kb[:, :, :end], vb[:, :, :end]

    def advance(self, row: int | None, t: int) -> None:
        """After an eager step: `t` more positions filled in the rows that took part."""
        for r in range(self.rows) if row is None else [row]:
            self.lengths[r] += t
        self._positions_stale = True

    # --- the static-shape step ----------------------------------------------------------------------
    def device_positions(self) -> torch.Tensor:
        """The per-row lengths as a device tensor that the static step reads (refreshed if eager steps ran)."""
        if self._positions_stale:
            self.positions.copy_(torch.tensor(self.lengths, dtype=torch.long), non_blocking=False)
            self._positions_stale = False
        return self.positions

    def write_static(self, kv_index: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write one new position in each of the first N = len(k) rows, at `positions` (a device tensor), with no
        host values: capturable. Returns those rows' keys and values over the whole room."""
        n = k.shape[0]
        idx = positions.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        kb, vb = self.k[kv_index][:n], self.v[kv_index][:n]
        kb.scatter_(2, idx, k)
        vb.scatter_(2, idx, v)
        return kb, vb

    def count_static_step(self) -> None:
        """On the host, after a static step ran (or replayed): one more position in every row. The step itself
        advanced `positions` on the device."""
        self.lengths = [n + 1 for n in self.lengths]
