"""What the trunk server's event loop spends on a decode step, with no network and no device: the serving path alone.

N sessions step at once on one event loop through the servicer's own `_step` (parse the request, decode and check
the hidden state, queue it with the runtime, await the batch, encode and serialize the answer), and the runtime's
scheduler thread batches them over a device that takes no time. What it reports, steps/s and microseconds a step,
is the ceiling the servicer and runtime put on a server before gRPC and the GPU take their share: the number to
compare when changing the per-step path (README, "Many clients, one trunk"). Any machine; a few seconds.

    python scripts/bench_loop.py                          # N = 1, 16, 64 on uvloop
    python scripts/bench_loop.py --sessions 16 --event-loop asyncio --json loop.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench import numbers  # noqa: E402
from scripts.simulated_server import SimulatedDevice  # noqa: E402
from server.app import configure_switch_interval  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.runtime import TrunkRuntime  # noqa: E402
from server.servicer import TrunkServicer  # noqa: E402
from server.sessions import SessionRegistry  # noqa: E402
from splitcomm import codec  # noqa: E402
from splitcomm.channel import new_event_loop  # noqa: E402
from splitcomm.proto import trunk_pb2 as pb  # noqa: E402
from splitcore.models import resolve_model  # noqa: E402
from splitcore.parts import load_parts  # noqa: E402


def measure(trunk, n: int, seconds: float, loop_kind: str, wire: torch.dtype) -> dict:
    """N sessions stepping for `seconds` on a fresh loop, runtime and servicer, through the servicer's `_step`:
    steps/s and the mean batch."""
    rt = TrunkRuntime(trunk, n, 64, max_batch=n)  # the device below keeps no position: 64 is plenty
    rt.trunk = rt.decode_batch.trunk = SimulatedDevice(trunk, 0.0)  # a decode batch takes no time and keeps nothing
    sessions = SessionRegistry(n + 1, 0)
    svc = TrunkServicer(trunk, pb.ServerInfo(), None, sessions, 1 << 24, 1.0, 1, rt)
    hidden = codec.encode(torch.randn(1, 1, trunk.config.n_embd), wire)
    steps = [0] * n

    async def session(i: int, stop: float) -> None:
        s = sessions.open("bench", 1 << 20, lambda reason: None)
        s.slot, s.max_length = rt.acquire_slot(), 1 << 20
        while time.perf_counter() < stop:
            raw = pb.StepRequest(step=pb.Step(step=steps[i], hidden=hidden)).SerializeToString()  # as received
            (await svc._step(s, pb.StepRequest.FromString(raw))).SerializeToString()  # as sent
            steps[i] += 1

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(session(i, t0 + seconds) for i in range(n)))
        return time.perf_counter() - t0

    loop = new_event_loop(loop_kind)
    try:
        wall = loop.run_until_complete(main())
    finally:
        loop.close()
        rt.stop()
        svc.pool.shutdown()
        sessions.shutdown()
    total = sum(steps)
    return {
        "sessions": n,
        "steps_per_s": total / wall,
        "us_per_step": wall / total * 1e6,
        "mean_batch": rt.stats.batched_rows / max(1, rt.stats.batches),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny", help="only its width matters (the device takes no time)")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--sessions", type=numbers(int, 1), default="1,16,64", help="N, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="how long each N steps")
    p.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=ServerConfig.switch_interval_ms,
        help="the interpreter's switch interval, as the server sets it (default: the server's)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    configure_switch_interval(args.switch_interval_ms)  # the scheduler thread and the loop share the GIL as on a server
    model = resolve_model(args.model, args.models_dir)
    trunk = load_parts(model, "2,10", ("trunk",))["trunk"]
    rows = []
    for n in args.sessions:
        wire = codec.WIRE_DTYPES[args.wire_dtype]
        rows.append(measure(trunk, n, args.seconds, args.event_loop, wire))
        print(f"  N={n}: {rows[-1]['steps_per_s']:,.0f} steps/s", file=sys.stderr)
    print(
        f"\nno network, a device of 0 ms; {args.event_loop} loop, {args.wire_dtype} wire, "
        f"switch interval {args.switch_interval_ms:g} ms\n"
    )
    print("| sessions | steps/s | us a step | mean batch |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']} | {r['steps_per_s']:,.0f} | {r['us_per_step']:.1f} | {r['mean_batch']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "switch_interval_ms": args.switch_interval_ms}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
