"""The relay between the trunk server's gRPC fronts and its engine (`python -m server --fronts N`).

One event loop carries gRPC's cost for every message of every session: at 64 sessions on an H100 host that loop,
not the GPU, bounds what the trunk serves (an echo server with no model at all carries about as many messages as
25x one session needs). With fronts, N processes share the public port (SO_REUSEPORT) and terminate the clients'
gRPC; each relays the messages of all its sessions to the engine, the process that owns the model, over one stream
on a local socket, many messages to a relay batch. The engine's loop then pays gRPC's per-message cost once per
batch. Each relayed session runs the servicer's own Session handler, fed from the relay, so that opening, limits,
errors and the idle reaper are the same code as without fronts; its decode steps start at once with no task of
their own (`TrunkServicer.step_now`, the same checks and answer as `_step`), the steps of a relay batch queued with
the runtime together.

Both ends use the same outbox: items queue as they come and one writer sends all that have queued each time it
gets to write, so a batch is whatever arrived while the previous one was being written (the answers of one
decode batch are settled in one pass of the loop, and go out together).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from server.futures import Held
from splitcomm.proto import trunk_pb2 as pb

logger = logging.getLogger(__name__)

RELAY_SERVICE = pb.DESCRIPTOR.services_by_name["TrunkRelay"].full_name
RELAY_METHOD = f"/{RELAY_SERVICE}/Relay"
BATCH_BYTES = 64 * 2**20  # a relay batch holds at most this much (one larger item goes alone): protobuf's 2 GiB cap
STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
FRONT_NAME = "x-gpt2split-front"  # metadata of a relay: the front's name, for the engine's log
CLIENT_PEER = "x-gpt2split-peer"  # metadata of a call a front passes on: the client's address


@dataclass
class RelayStats:
    """Running totals of the engine's relay (Prometheus reads them): relay batches and the items in them, each
    way; items over batches is how many messages one relay message carried."""

    fronts: int = 0  # relay streams open: fronts connected
    batches_in: int = 0
    items_in: int = 0
    batches_out: int = 0
    items_out: int = 0


class Outbox:
    """Relay items waiting to be written; `batches` yields what has queued each time the writer is free."""

    def __init__(self):
        self._items: list[pb.RelayItem] = []
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, item: pb.RelayItem) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def batches(self) -> AsyncIterator[pb.RelayBatch]:
        while True:
            while not self._items:
                if self.closed:
                    return
                self._ready.clear()
                await self._ready.wait()
            size, n = 0, 0
            for it in self._items:
                size += len(it.message)
                if n and size > BATCH_BYTES:
                    break
                n += 1
            batch, self._items = self._items[:n], self._items[n:]
            yield pb.RelayBatch(items=batch)


class _Context:
    """What the servicer's handlers use of a gRPC context, for a relayed call: the client's address, and abort,
    which ends the call with a status sent to the front."""

    def __init__(self, peer: str, end: Callable[[grpc.StatusCode, str], None]):
        self._peer, self._end = peer, end

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._end(code, details)
        raise grpc.aio.AbortError(details)


class _Call:
    """One relayed session stream on the engine: the task that serves it (the servicer's Session handler) and the
    requests it has yet to read. A decode step that comes while the task waits for its next request starts at
    once, with no task (`step_now`), and its answer goes straight out. The task reads nothing more until that
    step is answered, so the session's steps stay in order, and it cannot end while the step runs (its slot is
    given back only when nothing of it is in flight)."""

    def __init__(self, stream: int, out: Outbox):
        self.stream, self.out = stream, out
        self.ended = False  # its end (and status) has gone to the front
        self.requests: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.session = None  # once open
        self.waiting = False  # the task waits for its next request
        self.busy = False  # a step started at once is in flight
        self.answer_seen: asyncio.Future | None = None  # what the task awaits while it is (refuses cancel)
        self.failed: BaseException | None = None  # how such a step failed: the task raises it

    def opened(self, session) -> None:
        self.session = session

    def idle(self) -> bool:
        """Open, and waiting for its next request with nothing queued or in flight: a step may start at once."""
        return self.waiting and not self.busy and self.session is not None and self.requests.empty()

    def answered(self, result) -> None:
        """The answer of a step started at once: the response goes to the front; an error, to the task."""
        self.busy = False
        if isinstance(result, BaseException):
            self.failed = result
            self.requests.put_nowait(_WAKE)
        else:
            self.send(result)
        if self.answer_seen is not None:
            self.answer_seen.set_result(None)
            self.answer_seen = None

    def send(self, resp: pb.StepResponse) -> None:
        self.out.put(pb.RelayItem(stream=self.stream, message=resp.SerializeToString(), has_message=True))

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """The call is over, with this status: the front is told once."""
        if not self.ended:
            self.ended = True
            self.out.put(pb.RelayItem(stream=self.stream, end=True, code=code.value[0], details=details))

    async def iterate(self) -> AsyncIterator:
        while True:
            self.waiting = True
            try:
                req = await self.requests.get()
            finally:
                self.waiting = False
                if self.busy:  # cancelled or not, a step in flight is answered first
                    self.answer_seen = Held(loop=asyncio.get_running_loop())
                    await self.answer_seen
            if self.failed is not None:
                raise self.failed
            if req is None:
                return
            yield req


_WAKE = object()  # wakes a call's task to raise how its step failed


def _closed(out: Outbox, reader: asyncio.Task) -> None:
    """The front's side of the relay has ended: so does the engine's, once its answers are out."""
    if not reader.cancelled() and reader.exception() is not None:
        logger.warning("relay from a gRPC front broke: %r", reader.exception())
    out.close()


class RelayServicer:
    """The engine's end of the relay. `servicer` serves each relayed session stream with its Session handler
    (request iterator, context, opened) and starts decode steps at once with `step_now`; `parse` reads a
    StepRequest's bytes."""

    def __init__(self, servicer, parse: Callable[[bytes], object]):
        self._servicer, self._parse = servicer, parse
        self.stats = RelayStats()

    async def Relay(self, request_iterator, context):
        out, calls = Outbox(), {}
        front = dict(context.invocation_metadata() or ()).get(FRONT_NAME, context.peer())
        reader = asyncio.ensure_future(self._read(request_iterator, out, calls, front))
        reader.add_done_callback(functools.partial(_closed, out))
        stats = self.stats
        stats.fronts += 1
        try:
            async for batch in out.batches():
                stats.batches_out += 1
                stats.items_out += len(batch.items)
                yield batch
        finally:  # the front has gone (or the server stops): end its sessions, which gives their slots back
            stats.fronts -= 1
            reader.cancel()
            tasks = [c.task for c in calls.values() if c.task is not None]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            logger.info("relay from gRPC front %s ended (%d sessions open on it ended too)", front, len(tasks))

    async def _read(self, request_iterator, out: Outbox, calls: dict[int, _Call], front: str) -> None:
        logger.info("gRPC front %s connected", front)
        newest = 0  # a front numbers its streams 1, 2, ... and opens them in that order
        stats = self.stats
        async for batch in request_iterator:
            stats.batches_in += 1
            stats.items_in += len(batch.items)
            starts: list = []  # decode steps that start at once, queued with the runtime together
            for item in batch.items:
                call = calls.get(item.stream)
                if call is None:
                    if item.stream <= newest:
                        continue  # a late item of a stream that has ended here: its front forgets it too
                    newest = item.stream
                    call = calls[item.stream] = _Call(item.stream, out)
                    call.task = asyncio.ensure_future(self._serve(call, item.peer, calls))
                if item.has_message:
                    req = self._parse(item.message)
                    if call.idle() and self._servicer.step_now(call.session, req, call.answered, starts):
                        call.busy = True
                    else:
                        call.requests.put_nowait(req)
                if item.end:
                    call.requests.put_nowait(None)
                if item.cancel:
                    call.task.cancel()
            if starts:
                self._servicer.runtime.decode_then(starts)

    async def _serve(self, call: _Call, peer: str, calls: dict[int, _Call]) -> None:
        try:
            async for resp in self._servicer.Session(call.iterate(), _Context(peer, call.end), call.opened):
                call.send(resp)
            call.end(grpc.StatusCode.OK, "")
        except grpc.aio.AbortError:
            pass  # its status went out with `end`
        except asyncio.CancelledError:
            call.end(grpc.StatusCode.CANCELLED, "cancelled")  # the front has forgotten it, or is gone
        finally:
            calls.pop(call.stream, None)
