"""How a generation reaches its trunk on a server: a session that keeps the trunk's KV cache there and replays
itself on another server (or replica) when its own goes away; a stateless link that carries the cache with every
call; and a delay for studying a trunk far away. Each has `forward(h)`, `truncate(length)` and `close()`, as the
in-process `splitcore.generate.LocalTrunkLink` has."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from splitcomm.errors import TrunkError, TrunkUnavailable
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.trunk_client import TrunkClient, TrunkSession
from splitcore.errors import InvalidInput
from splitcore.generate import TrunkReply

logger = logging.getLogger(__name__)


class SessionLink:
    """Trunk on a server, KV cache there. If the server goes away, reconnects and replays the prefix.

    The hidden states sent so far are kept ([1, T, d]: 3 MB at 1024 tokens for GPT-2 small) so that a new
    session on a restarted server can rebuild its cache in one step and the generation goes on unchanged."""

    def __init__(
        self,
        client: TrunkClient,
        fingerprint: pb.Fingerprint,
        max_length: int,
        wire_dtype: torch.dtype,
        reconnect_s: float,
        notify: Callable[[str], None],
        adapter: tuple[pb.LoraSpec, pb.AdapterState] | None = None,
    ):
        self.client, self.fingerprint, self.max_length, self.adapter = client, fingerprint, max_length, adapter
        self.wire_dtype, self.reconnect_s, self.notify = wire_dtype, reconnect_s, notify
        self.history: list[torch.Tensor] = []
        self.length = 0  # positions the trunk holds for this link
        self._truncate_to: int | None = None  # a rollback to send with the next step
        self.session: TrunkSession | None = self._open()

    def _open(self) -> TrunkSession:
        return self.client.session(self.fingerprint, self.max_length, self.wire_dtype, self.adapter)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on. Free: the rollback goes to the server with the next step, and
        a replay after a restart sends only what is kept."""
        if not 0 <= length <= self.length:
            raise InvalidInput(f"cannot truncate to {length} positions: the trunk holds {self.length}")
        if length < self.length:
            while self.history and self.length - self.history[-1].shape[1] >= length:  # whole steps past it go
                self.length -= self.history.pop().shape[1]
            if self.length > length:  # and the part of the last one past it
                self.history[-1] = self.history[-1][:, : self.history[-1].shape[1] - (self.length - length)]
            self.length = self._truncate_to = length

    def forward(self, h: torch.Tensor) -> TrunkReply:
        try:
            out = self._step(h) if self.length or self.history else self._first_step(h)
        except TrunkUnavailable as e:
            if self.reconnect_s <= 0:
                raise
            out = self._recover(h, e)
        self._truncate_to = None
        self.history.append(h)
        self.length += h.shape[1]
        return out

    def _step(self, h: torch.Tensor) -> TrunkReply:
        return self.session.step(h, self._truncate_to)

    def _first_step(self, h: torch.Tensor) -> TrunkReply:
        """The session's first step, which opens it. Over replicas, one that is full refuses it (RESOURCE_EXHAUSTED:
        its sessions or KV slots are all taken) while another may have room: round robin sends each try to the next
        replica, one try each."""
        target = self.client.target
        tries = len(target.replicas) if target.balanced else 1
        for i in range(tries):
            try:
                return self._step(h)
            except TrunkError as e:
                if e.status != "RESOURCE_EXHAUSTED" or i == tries - 1:
                    raise
                logger.info("a replica is full (%s); trying the next", e)
                self.session.close()
                self.session = self._open()
        raise AssertionError("unreachable")

    def _recover(self, h: torch.Tensor, first_error: TrunkError) -> TrunkReply:
        """Open a new session (with replicas, on a healthy one), send every position so far plus the new ones, keep
        the new ones' output. The first try goes at once: another replica may be there already."""
        deadline, delay, error = time.monotonic() + self.reconnect_s, 0.25, first_error
        lost = f"replica {self.session.replica}" if self.session.replica else "trunk server"
        self.notify(f"{lost} lost ({error}); replaying the session for up to {self.reconnect_s:g} s")
        first = True
        while time.monotonic() < deadline:
            self.session.close()
            if not first:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)
            first = False
            try:
                self.session = self._open()
                full = torch.cat([*self.history, h], dim=1)
                out, ms, b_out, b_in = self.session.step(full)
                where = f" on replica {self.session.replica}" if self.session.replica else ""
                self.notify(f"trunk session back{where}: replayed {full.shape[1] - h.shape[1]} tokens")
                return TrunkReply(out[:, -h.shape[1] :], ms, b_out, b_in)
            except TrunkUnavailable as e:
                error = e
        raise TrunkUnavailable(f"gave up after {self.reconnect_s:g} s: {error}", error.code)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class StatelessLink:
    """Trunk on a server that keeps nothing: the client holds the trunk KV cache and sends it every call.

    The cache ([blocks, 2, batch, heads, positions, head_dim]) lives in a buffer with room for the whole
    generation (doubling if the length is unknown): each call writes the new positions in place and sends a view
    of the filled part."""

    def __init__(self, client: TrunkClient, fingerprint: pb.Fingerprint, wire_dtype: torch.dtype, max_length: int = 0):
        self.client, self.fingerprint, self.wire_dtype = client, fingerprint, wire_dtype
        self.max_length = max_length
        self._buf: torch.Tensor | None = None
        self.length = 0

    @property
    def kv(self) -> torch.Tensor | None:
        return None if self._buf is None else self._buf[:, :, :, :, : self.length]

    def _append(self, new: torch.Tensor) -> None:
        end = self.length + new.shape[4]
        room = 0 if self._buf is None else self._buf.shape[4]
        if end > room:
            buf = new.new_empty((*new.shape[:4], max(end, self.max_length, 2 * room), new.shape[5]))
            if self.length:
                buf[:, :, :, :, : self.length] = self.kv
            self._buf = buf
        self._buf[:, :, :, :, self.length : end] = new
        self.length = end

    def forward(self, h: torch.Tensor) -> TrunkReply:
        out, new_kv, ms, b_out, b_in = self.client.forward(self.fingerprint, h, self.kv, self.wire_dtype)
        self._append(new_kv)
        return TrunkReply(out, ms, b_out, b_in)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on: the next call sends the cache up to there."""
        if not 0 <= length <= self.length:
            raise InvalidInput(f"cannot truncate to {length} positions: the trunk cache holds {self.length}")
        self.length = length

    def close(self) -> None:
        self._buf, self.length = None, 0


class DelayedLink:
    """Adds a fixed one-way delay before and after each trunk call, to study a trunk far away on a LAN/WAN."""

    def __init__(self, link, delay_ms: float):
        self.link, self.delay_s = link, delay_ms / 1e3

    def forward(self, h: torch.Tensor) -> TrunkReply:
        time.sleep(self.delay_s)
        out = self.link.forward(h)
        time.sleep(self.delay_s)
        return out

    def truncate(self, length: int) -> None:
        self.link.truncate(length)  # travels with the next step: no delay of its own

    def close(self) -> None:
        self.link.close()
