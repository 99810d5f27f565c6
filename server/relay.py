"""The relay between the trunk server's gRPC fronts and its engine (`python -m server --fronts N`).

One event loop carries gRPC's cost for every message of every session: at 64 sessions on an H100 host that loop,
not the GPU, bounds what the trunk serves (an echo server with no model at all carries about as many messages as
25x one session needs). With fronts, N processes share the public port (SO_REUSEPORT) and terminate the clients'
gRPC; each relays the messages of all its sessions to the engine, the process that owns the model, over one stream
on a local socket, many messages to a relay batch. The engine's loop then pays gRPC's per-message cost once per
batch; it still runs each session's step (parse, checks, the runtime, encode) as without fronts, with the same
code: the servicer's Session handler, fed from the relay.

Both ends use the same outbox: items queue as they come and one writer sends all that have queued each time it
gets to write, so a batch is whatever arrived while the previous one was being written (the answers of one
decode batch are settled in one pass of the loop, and go out together).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from splitcomm.proto import trunk_pb2 as pb

logger = logging.getLogger(__name__)

RELAY_SERVICE = pb.DESCRIPTOR.services_by_name["TrunkRelay"].full_name
RELAY_METHOD = f"/{RELAY_SERVICE}/Relay"
BATCH_BYTES = 64 * 2**20  # a relay batch holds at most this much (one larger item goes alone): protobuf's 2 GiB cap
STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}


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


class _End(Exception):
    """A relayed call ended with a status that has been sent to its front."""


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
    """One relayed session stream on the engine: its requests as they come, and the task that serves it."""

    def __init__(self):
        self.requests: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.ended = False

    async def iterate(self) -> AsyncIterator:
        while (req := await self.requests.get()) is not None:
            yield req


class RelayServicer:
    """The engine's end of the relay: serves every session stream of a front with `session`, the servicer's
    Session handler (request iterator, context) -> responses; `parse` reads a StepRequest's bytes."""

    def __init__(self, session: Callable, parse: Callable[[bytes], object]):
        self._session, self._parse = session, parse

    async def Relay(self, request_iterator, context):
        out, calls = Outbox(), {}
        reader = asyncio.ensure_future(self._read(request_iterator, out, calls, context.peer()))
        reader.add_done_callback(lambda _: out.close())
        try:
            async for batch in out.batches():
                yield batch
        finally:  # the front has gone (or the server stops): end its sessions, which gives their slots back
            reader.cancel()
            tasks = [c.task for c in calls.values() if c.task is not None]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            logger.info("relay from gRPC front %s ended (%d sessions open on it ended too)", context.peer(), len(tasks))

    async def _read(self, request_iterator, out: Outbox, calls: dict[int, _Call], front: str) -> None:
        logger.info("gRPC front %s connected", front)
        newest = 0  # a front numbers its streams 1, 2, ... and opens them in that order
        async for batch in request_iterator:
            for item in batch.items:
                call = calls.get(item.stream)
                if call is None:
                    if item.stream <= newest:
                        continue  # a late item of a stream that has ended here: its front forgets it too
                    newest = item.stream
                    call = calls[item.stream] = _Call()
                    call.task = asyncio.ensure_future(self._serve(item.stream, item.peer, call, out, calls))
                if item.has_message:
                    call.requests.put_nowait(self._parse(item.message))
                if item.end:
                    call.requests.put_nowait(None)
                if item.cancel:
                    call.task.cancel()

    async def _serve(self, stream: int, peer: str, call: _Call, out: Outbox, calls: dict[int, _Call]) -> None:
        def end(code: grpc.StatusCode, details: str) -> None:
            if not call.ended:
                call.ended = True
                out.put(pb.RelayItem(stream=stream, end=True, code=code.value[0], details=details))

        try:
            async for resp in self._session(call.iterate(), _Context(peer, end)):
                out.put(pb.RelayItem(stream=stream, message=resp.SerializeToString(), has_message=True))
            end(grpc.StatusCode.OK, "")
        except grpc.aio.AbortError:
            pass  # its status went out with `end`
        except asyncio.CancelledError:
            end(grpc.StatusCode.CANCELLED, "cancelled")  # the front has forgotten it, or is gone
        finally:
            calls.pop(stream, None)
