"""The relay between the trunk server's gRPC fronts and its engine (`python -m server --fronts N`).

One event loop carries gRPC's cost for every message of every session: at 64 sessions on an H100 host that loop,
not the GPU, bounds what the trunk serves (an echo server with no model at all carries about as many messages as
25x one session needs). With fronts, N processes share the public port (SO_REUSEPORT) and terminate the clients'
gRPC; each relays the messages of all its sessions to the engine, the process that owns the model, over one stream
on a local socket, many messages to a relay batch. The engine's loop then pays gRPC's per-message cost once per
batch.

- **Plain decode steps travel packed** (`RelayRows`): a front parses each session message, and one that is a
  decode step and nothing else (one position, float32 or float16, no rollback) goes as a row: its stream, its step
  number and its raw hidden state, the rows of a batch one after the other in one bytes field. The engine reads
  all of a batch's rows with one numpy call (and checks them finite with another), starts them with no task and no
  message of their own, as one piece of work for the runtime (`TrunkServicer.start_rows`), and answers in rows
  too, all of a piece's at once, from which the front builds each StepResponse. So per decode step the engine
  parses and builds no protobuf message and makes no Python object of its own; the fronts, in parallel, do.
- **Everything else** (open, prompt, rollback, adapters, malformed messages, and a row that cannot start at once)
  goes the servicer's usual way: each relayed session runs the servicer's own Session handler, fed from the relay,
  so that opening, limits, errors and the idle reaper are the same code as without fronts. A row that cannot start
  at once is made a StepRequest again, and `_step` says what is wrong with it.

Both ends use the same outbox: items and rows queue as they come and one writer sends all that have queued each
time it gets to write, so a batch is whatever arrived while the previous one was being written (the answers of one
decode batch are settled in one pass of the loop, and go out together). A batch's items are read before its rows;
the outbox starts a new batch rather than put a stream's item, or a second row, after a row of it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from server.futures import Held
from splitcomm.proto import trunk_pb2 as pb

logger = logging.getLogger(__name__)

RELAY_SERVICE = pb.DESCRIPTOR.services_by_name["TrunkRelay"].full_name
RELAY_METHOD = f"/{RELAY_SERVICE}/Relay"
BATCH_BYTES = 64 * 2**20  # a relay batch holds at most this much (one larger item goes alone): protobuf's 2 GiB cap
STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
FRONT_NAME = "x-gpt2split-front"  # metadata of a relay: the front's name, for the engine's log
CLIENT_PEER = "x-gpt2split-peer"  # metadata of a call a front passes on: the client's address
_ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2}  # the wire dtypes of rows (no numpy here: a front loads none)


@dataclass
class RelayStats:
    """Running totals of the engine's relay (Prometheus reads them): relay batches and the items in them (messages,
    events and rows), each way; items over batches is how many messages one relay message carried."""

    fronts: int = 0  # relay streams open: fronts connected
    batches_in: int = 0
    items_in: int = 0
    batches_out: int = 0
    items_out: int = 0
    rows_in: int = 0  # of the items: decode steps packed as rows, and their answers
    rows_out: int = 0


def plain_decode(raw: bytes) -> tuple[int, int, int, bytes] | None:
    """(step, dtype, width, hidden bytes) of a serialized StepRequest that is a decode step and nothing else: one
    position of float32 or float16 with as many bytes as its shape says, no rollback. None for anything else, which
    a front relays as it is."""
    try:
        req = pb.StepRequest.FromString(raw)
    except DecodeError:
        return None
    if req.WhichOneof("kind") != "step" or req.step.HasField("truncate_to"):
        return None
    hidden = req.step.hidden
    size = _ITEMSIZE.get(hidden.dtype)
    shape = hidden.shape
    if size is None or len(shape) != 3 or shape[0] != 1 or shape[1] != 1 or shape[2] < 1:
        return None
    data = hidden.data  # read once: each read of a bytes field makes a bytes object
    if len(data) != shape[2] * size:
        return None
    return req.step.step, hidden.dtype, shape[2], data


def unpacked(rows: pb.RelayRows, i: int) -> pb.StepRequest:
    """Row `i` as the StepRequest it was packed from (for the usual path, which says what is wrong with it)."""
    size = rows.width * _ITEMSIZE.get(rows.dtype, 0)
    hidden = pb.Tensor(data=rows.data[i * size : (i + 1) * size], shape=(1, 1, rows.width), dtype=rows.dtype)
    return pb.StepRequest(step=pb.Step(step=rows.step[i], hidden=hidden))


def answers(rows: pb.RelayRows) -> Iterator[tuple[int, bytes]]:
    """(stream, serialized StepResponse) for each row of the engine's packed answers."""
    wire, width, data = rows.dtype, rows.width, rows.data
    size, shape = width * _ITEMSIZE[wire], (1, 1, width)
    for i, (stream, step, length, ms, wall) in enumerate(
        zip(rows.stream, rows.step, rows.cache_length, rows.server_ms, rows.server_wall_ms, strict=True)
    ):
        hidden = pb.Tensor(data=data[i * size : (i + 1) * size], shape=shape, dtype=wire)
        resp = pb.StepResponse(step=step, hidden=hidden, server_ms=ms, cache_length=length, server_wall_ms=wall)
        yield stream, resp.SerializeToString()


class _Rows:
    """The rows of one dtype and width in the batch being filled."""

    __slots__ = ("stream", "step", "data", "cache_length", "server_ms", "server_wall_ms")

    def __init__(self):
        self.stream, self.step, self.data = [], [], []
        self.cache_length, self.server_ms, self.server_wall_ms = [], [], []

    def message(self, wire: int, width: int) -> pb.RelayRows:
        return pb.RelayRows(
            stream=self.stream,
            step=self.step,
            dtype=wire,
            width=width,
            data=b"".join(self.data),
            cache_length=self.cache_length,
            server_ms=self.server_ms,
            server_wall_ms=self.server_wall_ms,
        )


class Outbox:
    """Relay items and rows waiting to be written; `batches` yields what has queued each time the writer is free.
    A stream's item, or second row, after a row of it in the batch being filled starts a new batch (a batch's
    items are read before its rows), as does one that would take a batch past BATCH_BYTES.

    A front's outbox also gathers: a batch waits, up to `hold_s`, for a row of each stream it `want`s (the sessions
    whose decode steps were just answered), so that the next steps of a front's decoding sessions reach the engine
    in one relay batch rather than one or two at a time (each relay message costs the engine's event loop as much as
    several rows). A stream that does not send in time is not waited for again until it is answered again."""

    def __init__(self):
        self._full: collections.deque[pb.RelayBatch] = collections.deque()  # closed to more: they go first
        self._items: list[pb.RelayItem] = []
        self._rows: dict[tuple[int, int], _Rows] = {}
        self._rowed: set[int] = set()  # streams with a row in the batch being filled
        self._size = 0
        self._ready = asyncio.Event()
        self.closed = False
        self.hold_s = 0.0
        self._wanted: set[int] = set()  # streams whose next row the batch being filled waits for
        self._complete: asyncio.Future | None = None  # what the writer awaits while it waits for them

    def want(self, stream: int) -> None:
        """The next batch waits, up to `hold_s`, for this stream's next message."""
        self._wanted.add(stream)

    def _got(self, stream: int) -> None:
        if self._wanted:
            self._wanted.discard(stream)
            if not self._wanted and self._complete is not None:
                _wake(self._complete)

    def put(self, item: pb.RelayItem) -> None:
        self._got(item.stream)
        if item.stream in self._rowed:
            self._close_batch()
        self._add(len(item.message))
        self._items.append(item)

    def put_row(self, stream: int, step: int, wire: int, width: int, data: bytes) -> None:
        """A decode step (front to engine)."""
        self.put_rows([stream], [step], wire, width, data)

    def put_rows(
        self,
        streams: list[int],
        steps: list[int],
        wire: int,
        width: int,
        data: bytes,
        answers: tuple[list[int], float, float] | None = None,
    ) -> None:
        """Decode steps of `streams` (front to engine), or with `answers` (their cache lengths, server ms, server
        wall ms) their answers (engine to front): `data` holds their rows one after the other. They go in one
        batch, a new one if any of them has a row in the batch being filled."""
        if self._wanted:
            for stream in streams:
                self._got(stream)
        if not self._rowed.isdisjoint(streams):
            self._close_batch()
        self._add(len(data))
        rows = self._rows.get((wire, width))
        if rows is None:
            rows = self._rows[(wire, width)] = _Rows()
        rows.stream += streams
        rows.step += steps
        rows.data.append(data)
        if answers is not None:
            lengths, ms, wall = answers
            rows.cache_length += lengths
            rows.server_ms += [ms] * len(streams)
            rows.server_wall_ms += [wall] * len(streams)
        self._rowed.update(streams)

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        if self._complete is not None:
            _wake(self._complete)

    def _add(self, size: int) -> None:
        if (self._items or self._rows) and self._size + size > BATCH_BYTES:
            self._close_batch()
        self._size += size
        self._ready.set()

    def _close_batch(self) -> None:
        if self._items or self._rows:
            self._full.append(self._batch())

    def _batch(self) -> pb.RelayBatch:
        batch = pb.RelayBatch(items=self._items, rows=[r.message(*key) for key, r in self._rows.items()])
        self._items, self._rows, self._rowed, self._size = [], {}, set(), 0
        return batch

    async def batches(self) -> AsyncIterator[pb.RelayBatch]:
        while True:
            while not (self._full or self._items or self._rows):
                if self.closed:
                    return
                self._ready.clear()
                await self._ready.wait()
            if self._wanted and self.hold_s > 0 and not (self._full or self.closed):
                await self._hold()
            self._wanted.clear()  # those that did not come in time: not waited for until answered again
            yield self._full.popleft() if self._full else self._batch()

    async def _hold(self) -> None:
        loop = asyncio.get_running_loop()
        self._complete = loop.create_future()
        timer = loop.call_later(self.hold_s, _wake, self._complete)
        try:
            await self._complete
        finally:
            timer.cancel()
            self._complete = None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


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
    requests it has yet to read. A packed decode step that comes while the task waits for its next request starts
    at once, with no task (`start_rows`), and its answer goes straight out as a row. The task reads nothing more
    until that step is answered, so the session's steps stay in order, and it cannot end while the step runs (its
    slot is given back only when nothing of it is in flight)."""

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

    def answered(self, error: BaseException | None = None) -> None:
        """The step started at once has been answered (its row has gone to the front), or has failed with `error`,
        which the task raises."""
        self.busy = False
        if error is not None:
            self.failed = error
            self.requests.put_nowait(_WAKE)
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


def _answered(
    calls: list[_Call], streams: list[int], steps: list[int], wire: int, width: int, out: Outbox, part: slice, result
) -> None:
    """The answers of packed decode steps that started together (`part` of them, when they ran in pieces): rows to
    the front, or each session's task told the error."""
    if isinstance(result, BaseException):
        for call in calls[part]:
            call.answered(result)
        return
    data, ms, lengths, wall = result
    out.put_rows(streams[part], steps[part], wire, width, data, (lengths, ms, wall))
    for call in calls[part]:
        call.answered()


def _closed(out: Outbox, reader: asyncio.Task) -> None:
    """The front's side of the relay has ended: so does the engine's, once its answers are out."""
    if not reader.cancelled() and reader.exception() is not None:
        logger.warning("relay from a gRPC front broke: %r", reader.exception())
    out.close()


class RelayServicer:
    """The engine's end of the relay. `servicer` serves each relayed session stream with its Session handler
    (request iterator, context, opened) and starts packed decode steps at once (`decode_rows`, `can_start`,
    `start_rows`); `parse` reads a StepRequest's bytes."""

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
            runtime = self._servicer.runtime
            async for batch in out.batches():
                batch.hold_ms = runtime.gather_s() * 1e3 / 2  # a front holds its steps for half the scheduler's wait
                stats.batches_out += 1
                rows = sum(len(r.stream) for r in batch.rows)
                stats.items_out += len(batch.items) + rows
                stats.rows_out += rows
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
            for item in batch.items:
                call = calls.get(item.stream)
                if call is None:
                    if item.stream <= newest:
                        continue  # a late item of a stream that has ended here: its front forgets it too
                    newest = item.stream
                    call = calls[item.stream] = _Call(item.stream, out)
                    call.task = asyncio.ensure_future(self._serve(call, item.peer, calls))
                if item.has_message:
                    call.requests.put_nowait(self._parse(item.message))
                if item.end:
                    call.requests.put_nowait(None)
                if item.cancel:
                    call.task.cancel()
            if batch.rows:
                arrived = time.perf_counter()
                for rows in batch.rows:
                    stats.items_in += len(rows.stream)
                    stats.rows_in += len(rows.stream)
                    self._start(rows, calls, out, arrived)

    def _start(self, rows: pb.RelayRows, calls: dict[int, _Call], out: Outbox, arrived: float) -> None:
        """Start the packed decode steps that can start at once, together; hand each other one to its session's task
        as a StepRequest."""
        wire, width = rows.dtype, rows.width
        steps, streams = list(rows.step), list(rows.stream)  # an index into a repeated field costs more than a list's
        decoded = self._servicer.decode_rows(rows.data, wire, width, len(steps))
        hidden, finite = decoded if decoded is not None else ((), ())
        can_start, go = self._servicer.can_start, []
        for i, stream in enumerate(streams):
            call = calls.get(stream)
            if call is None:
                continue  # it has ended here: its front forgets it too
            if i < len(finite) and finite[i] and call.idle() and can_start(call.session, steps[i]):
                call.busy = True
                go.append(i)
            else:
                call.requests.put_nowait(unpacked(rows, i))
        if not go:
            return
        if len(go) < len(steps):
            hidden, streams, steps = hidden[go], [streams[i] for i in go], [steps[i] for i in go]
        group = [calls[stream] for stream in streams]
        answer = functools.partial(_answered, group, streams, steps, wire, width, out)
        self._servicer.start_rows([c.session for c in group], hidden.reshape(len(go), 1, width), wire, arrived, answer)

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
