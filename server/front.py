"""A gRPC front of the trunk server (`python -m server --fronts N` starts N of them; see server/relay.py).

It shares the server's public port with the other fronts (SO_REUSEPORT: the kernel hands each new connection to
one of them), checks the token, and relays: the messages of every session stream go to the engine many to a
relay batch and come back the same way; the other calls (Info, Forward, Monitor, Train) pass through one by one.
A front parses a session's messages only to pack its plain decode steps as rows, and builds their responses from
the engine's rows (server/relay.py); everything else passes as bytes. It never loads torch, numpy or the model. It
stops when told to (SIGTERM, SIGINT), letting its calls finish for --grace s, and when the engine has gone (its
stdin, a pipe from the engine, ends)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.relay import CLIENT_PEER, FRONT_NAME, RELAY_METHOD, STATUS_CODES, Outbox, answers, plain_decode
from splitcomm.channel import DEFAULT_MAX_MESSAGE_BYTES, add_port, make_server, method_handler, new_event_loop
from splitcomm.proto import trunk_pb2 as pb
from splitcore.errors import SplitError
from splitcore.logs import setup_logging

logger = logging.getLogger("server.front")  # run as __main__

SERVICE = pb.DESCRIPTOR.services_by_name["Trunk"]
READY = "gRPC front ready on port"
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
LOST = "the trunk server's engine has gone; retry later"
AHEAD = 8  # a session's messages relayed and not yet answered, at most: what a front holds of a client that floods


class Front:
    """The relay to the engine at `engine` (a local address) and the Trunk service's handlers over it."""

    def __init__(self, engine: str, name: str = "front"):
        self.name = name
        self.channel = grpc.aio.insecure_channel(engine, options=_UNLIMITED)  # the clients' limits apply at the front
        self.lost = asyncio.Event()
        self._out = Outbox()
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []

    async def connect(self, timeout: float) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)
        call = self.channel.stream_stream(
            RELAY_METHOD,
            request_serializer=pb.RelayBatch.SerializeToString,
            response_deserializer=pb.RelayBatch.FromString,
        )(metadata=((FRONT_NAME, self.name),))
        self._tasks = [asyncio.ensure_future(self._write(call)), asyncio.ensure_future(self._read(call))]

    async def _write(self, call) -> None:
        try:
            async for batch in self._out.batches():
                await call.write(batch)
            await call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the relay has broken: _read says so

    async def _read(self, call) -> None:
        try:
            while (batch := await call.read()) is not grpc.aio.EOF:
                for item in batch.items:
                    inbox = self._streams.get(item.stream)
                    if inbox is not None:
                        inbox.put_nowait(item)
                self._out.hold_s = batch.hold_ms / 1e3
                for rows in batch.rows:  # after the items: the engine's outbox keeps that order
                    for stream, message in answers(rows):
                        inbox = self._streams.get(stream)
                        if inbox is not None:
                            inbox.put_nowait(message)
                            self._out.want(stream)  # a decoding session: its next step is awaited
        except grpc.aio.AioRpcError as e:
            logger.error("relay to the engine broke: %s %s", e.code().name, e.details())
        finally:  # every open session ends: the engine that held its cache is gone
            self.lost.set()
            lost = pb.RelayItem(end=True, code=grpc.StatusCode.UNAVAILABLE.value[0], details=LOST)
            for inbox in self._streams.values():
                inbox.put_nowait(lost)

    async def close(self) -> None:
        self._out.close()
        await asyncio.wait(self._tasks, timeout=5)
        await self.channel.close()

    # --- Session, relayed ---------------------------------------------------------------------------------
    async def Session(self, request_iterator, context):
        if self.lost.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, LOST)
        stream = next(self._ids)
        inbox = self._streams[stream] = asyncio.Queue()
        self._out.put(pb.RelayItem(stream=stream, peer=context.peer()))
        ahead = asyncio.Semaphore(AHEAD)
        pump = asyncio.ensure_future(self._pump(stream, request_iterator, ahead))
        ended = False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, bytes):  # a response built from the engine's rows
                    ahead.release()
                    yield item
                    continue
                if item.has_message:
                    ahead.release()
                    yield item.message
                if item.end:
                    ended = True
                    if item.code:
                        await context.abort(STATUS_CODES[item.code], item.details)
                    return
        finally:
            pump.cancel()
            del self._streams[stream]
            if not ended:  # the client cancelled or went away: the engine ends the session and frees its slot
                self._out.put(pb.RelayItem(stream=stream, cancel=True))

    async def _pump(self, stream: int, request_iterator, ahead: asyncio.Semaphore) -> None:
        """The client's messages to the engine; a step waits while AHEAD of its session's are unanswered (gRPC's
        flow control then holds the client back, as it does without fronts)."""
        first = True
        async for raw in request_iterator:
            row = None
            if not first:  # every message but the opening one gets an answer
                await ahead.acquire()
                row = plain_decode(raw)
            first = False
            if row is None:
                self._out.put(pb.RelayItem(stream=stream, message=raw, has_message=True))
            else:
                self._out.put_row(stream, *row)
        self._out.put(pb.RelayItem(stream=stream, end=True))  # the client has closed its side

    # --- every other call, passed through -----------------------------------------------------------------
    def _passed(self, method):
        """A handler that makes the same call of the engine, bytes in and out, and hands back its status."""
        path = f"/{SERVICE.full_name}/{method.name}"
        if not method.server_streaming:
            call_engine = self.channel.unary_unary(path)

            async def unary(request, context):
                try:
                    return await call_engine(request, timeout=context.time_remaining(), metadata=_peer(context))
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), e.details())

            return unary
        call_engine = (self.channel.stream_stream if method.client_streaming else self.channel.unary_stream)(path)

        async def streamed(request_or_iterator, context):
            pump = None
            if method.client_streaming:
                call = call_engine(timeout=context.time_remaining(), metadata=_peer(context))
                pump = asyncio.ensure_future(_forward(request_or_iterator, call))
            else:
                call = call_engine(request_or_iterator, timeout=context.time_remaining(), metadata=_peer(context))
            try:
                while (resp := await call.read()) is not grpc.aio.EOF:
                    yield resp
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details())
            finally:
                if pump is not None:
                    pump.cancel()
                call.cancel()

        return streamed

    def handlers(self) -> grpc.GenericRpcHandler:
        out = {}
        for m in SERVICE.methods:
            fn = self.Session if m.name == "Session" else self._passed(m)
            out[m.name] = method_handler(m)(fn)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler(SERVICE.full_name, out)


def _peer(context) -> tuple:
    return ((CLIENT_PEER, context.peer()),)  # the engine logs and counts the client, not this front


async def _forward(request_iterator, call) -> None:
    """A client's requests into the engine's call, then the end of them."""
    try:
        async for req in request_iterator:
            await call.write(req)
        await call.done_writing()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the call has ended: its reader says how


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.front",
        description="A gRPC front of the trunk server; `python -m server --fronts N` starts them. The token, if "
        "any, comes from GPT2_AUTH_TOKEN.",
    )
    p.add_argument("--engine", required=True, help="the engine's local address (unix:PATH)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-client-ca")
    p.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    p.add_argument("--grace", type=float, default=10.0, help="on shutdown, calls in flight get this long, s")
    p.add_argument("--log-file")
    p.add_argument("--name", default="front", help="in the log")
    return p


async def serve(args: argparse.Namespace) -> None:
    front = Front(args.engine, args.name)
    try:
        await front.connect(timeout=30)
    except TimeoutError:
        raise OSError(f"cannot reach the engine at {args.engine}") from None
    server = make_server(args.max_message_bytes, os.environ.get("GPT2_AUTH_TOKEN") or None, share_port=True)
    server.add_generic_rpc_handlers((front.handlers(),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    host = args.host
    address = f"[{host}]:{args.port}" if ":" in host and not host.startswith("[") else f"{host}:{args.port}"
    port = add_port(server, address, args.tls_cert, args.tls_key, args.tls_client_ca)
    await server.start()
    for name in ("", SERVICE.full_name):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ready line: a signal after it stops this one cleanly
        loop.add_signal_handler(sig, stop.set)
    logger.info("%s serving on %s (pid %d), relaying to %s", args.name, address, os.getpid(), args.engine)
    print(f"{READY} {port}", flush=True)

    def engine_said() -> None:  # stdin is a pipe from the engine: it ends when the engine does
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, engine_said)
    lost = asyncio.ensure_future(front.lost.wait())
    lost.add_done_callback(lambda _: stop.set())
    await stop.wait()
    logger.info("%s stopping (grace %g s)", args.name, args.grace)
    await checks.enter_graceful_shutdown()
    await server.stop(args.grace)
    lost.cancel()
    await front.close()
    logger.info("%s stopped", args.name)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    loop = new_event_loop(args.event_loop)
    try:
        loop.run_until_complete(serve(args))
    except (OSError, SplitError) as e:
        print(f"error: {args.name}: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
