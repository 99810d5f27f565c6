"""What Python gRPC itself can carry on this host: N ping-pong streams against an echo server, no model.

Each stream sends one message of a decode step's size (a hidden vector of `--width` float32s) and waits for the
echo, as a decoding session does. The server is a separate process, sync (a thread per stream, as the trunk
server) or asyncio (`grpc.aio`, one event loop); the clients are asyncio streams in `--client-procs` processes.
It prints messages/s served in total and the round trip's p50 per N: the ceiling the trunk server's transport
puts on its tokens/s, whatever the GPU does.

    python scripts/bench_transport.py                        # sync and aio, N = 1, 4, 16, 64
    python scripts/bench_transport.py --servers sync --sessions 1,16 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from splitcore.stats import percentile  # noqa: E402

METHOD = "/bench.Echo/Stream"


def _echo_sync(request_iterator, context):
    yield from request_iterator


async def _echo_aio(request_iterator, context):
    async for m in request_iterator:
        yield m


def _handler(fn):
    return grpc.method_handlers_generic_handler("bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(fn)})


def serve(kind: str, port: int, workers: int, ready) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        server.add_generic_rpc_handlers((_handler(_echo_sync),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        server.wait_for_termination()
    else:

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_handler(_echo_aio),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            ready.set()
            await server.wait_for_termination()

        asyncio.run(main())


def client(port: int, streams: int, width: int, seconds: float, go, out) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_stream(METHOD)
            payload = os.urandom(width * 4)
            lat: list[float] = []
            counts = [0] * streams

            async def one(i: int, stop: float) -> None:
                stream = call()
                await stream.write(payload)  # warm: the stream is open before the clock starts
                await stream.read()
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    await stream.write(payload)
                    await stream.read()
                    lat.append(time.perf_counter() - t0)
                    counts[i] += 1
                await stream.done_writing()

            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            stop = time.monotonic() + seconds
            await asyncio.gather(*(one(i, stop) for i in range(streams)))
            out.put((sum(counts), lat[:: max(1, len(lat) // 2000)]))

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(kind: str, n: int, args) -> dict:
    ctx = mp.get_context("spawn")
    port, ready, go, out = free_port(), ctx.Event(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=serve, args=(kind, port, n + 8, ready), daemon=True)
    server.start()
    ready.wait(30)
    procs = min(args.client_procs, n)
    per = [n // procs + (i < n % procs) for i in range(procs)]
    clients = [ctx.Process(target=client, args=(port, k, args.width, args.seconds, go, out)) for k in per]
    for c in clients:
        c.start()
    time.sleep(1.0)  # channels connect
    go.set()
    done = [out.get(timeout=args.seconds + 60) for _ in clients]
    for c in clients:
        c.join(10)
    server.terminate()
    server.join(10)
    msgs = sum(d[0] for d in done)
    lat = [x for d in done for x in d[1]]
    return {
        "server": kind,
        "streams": n,
        "msgs_per_s": msgs / args.seconds,
        "rtt_p50_ms": statistics.median(lat) * 1e3 if lat else None,
        "rtt_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="sync,aio")
    p.add_argument("--sessions", default="1,4,16,64")
    p.add_argument("--width", type=int, default=768, help="floats per message (gpt2: 768)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = [measure(kind, int(n), args) for kind in args.servers.split(",") for n in args.sessions.split(",")]
    one = {r["server"]: r["msgs_per_s"] for r in rows if r["streams"] == 1}
    print("| server | streams | msgs/s | x one stream | rtt p50 ms | rtt p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = one.get(r["server"])
        x = f"{r['msgs_per_s'] / base:.2f}" if base else "-"
        print(
            f"| {r['server']} | {r['streams']} | {r['msgs_per_s']:.0f} | {x} | {r['rtt_p50_ms']:.3f} | "
            f"{r['rtt_p99_ms']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
