"""How the trunk server scales with its clients: N sessions decoding at once against one trunk server or several
replicas of it.

Hidden states come from a real bottom (the model's own, over a passage of English text), computed once and
replayed by every session, so that the clients' own compute does not hide the server's capacity. Sessions run
in client processes (threads within them) on this machine; the server is a separate process, as deployed.

For each N it reports the decode tokens/s served in total, the per-step latency p50 and p99 of the sessions,
and the time to first token of a newcomer (its open and prompt) while the N decode, against an idle server.
Prints a markdown table, writes JSON (--json) and a plotly chart (--plot).

    python scripts/bench_server.py                                # random:gpt2, N = 1, 2, 4, 8, 16, 32, 64
    python scripts/bench_server.py --quick                        # N = 1, 2, 4, 8; fewer steps
    python scripts/bench_server.py --unbatched                    # and the same with --max-batch 1
    python scripts/bench_server.py --switch-interval-ms 0.1,0     # the server's GIL switch interval: 0.1, Python's 5 ms
    python scripts/bench_server.py --replicas 1,2                 # one replica, then two (the client's round robin)
    python scripts/bench_server.py --replicas 1,2 --through client,nginx  # and behind nginx (deploy/nginx.conf)
    python scripts/bench_server.py --model random:tiny --simulate-device-ms 0.6  # a GPU-like device, on a CPU

`--simulate-device-ms` runs scripts/simulated_server.py: the real server whose decode batches sleep that long
whatever their rows, as on a GPU, so that the serving path can be measured for a GPU on a CPU.
    python scripts/bench_server.py --device cuda --dtype float16  # the server on a GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench import numbers, start_server  # noqa: E402
from scripts.bench_transport import free_port  # noqa: E402
from scripts.nginx_proxy import Nginx  # noqa: E402
from splitcomm.channel import channel_args  # noqa: E402
from splitcomm.messages import SERVICE_NAME  # noqa: E402
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig  # noqa: E402
from splitcore.models import load_tokenizer, resolve_model  # noqa: E402
from splitcore.parts import load_parts  # noqa: E402
from splitcore.settings import DEFAULT_SPLIT  # noqa: E402
from splitcore.stats import percentile  # noqa: E402

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night. And the "
    "evening and the morning were the first day. "
)


def hidden_states(model_spec: str, models_dir: str, prompt: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom's output for a prompt of `prompt` tokens and the `steps` tokens after it: (1, P, C), (S, 1, C)."""
    model = resolve_model(model_spec, models_dir)
    ids = load_tokenizer(model.path).encode(TEXT * 20)[: prompt + steps]
    bottom = load_parts(model, DEFAULT_SPLIT, ("bottom",))["bottom"]
    with torch.inference_mode():
        h = bottom(torch.tensor([ids]))  # causal: position i sees what the bottom would see in a generation
    return h[:, :prompt].clone(), h[0, prompt:].unsqueeze(1).clone()


def worker(target, wire, n_sessions, prompt_h, step_hs, ready, go, done_steps, out) -> None:
    """One client process: its sessions in threads; each prefills, waits for `go`, then decodes every step."""
    torch.set_num_threads(1)
    client = TrunkClient(TrunkClientConfig(target))
    fp = client.info().fingerprint
    dtype = getattr(torch, wire)
    sessions = [client.session(fp, prompt_h.shape[1] + step_hs.shape[0] + 1, dtype) for _ in range(n_sessions)]
    for s in sessions:
        s.step(prompt_h)
    ready.put(n_sessions)
    go.wait()
    results = [None] * n_sessions

    def run(i: int) -> None:
        s, lat = sessions[i], []
        start = time.monotonic()
        for x in step_hs:
            t0 = time.perf_counter()
            s.step(x.unsqueeze(0))
            lat.append((time.perf_counter() - t0) * 1e3)
            with done_steps.get_lock():
                done_steps.value += 1
        results[i] = (lat, start, time.monotonic())
        s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    out.put(results)


async def replica_cycle(channel, replicas: int) -> list[str]:
    """The order in which a round-robin channel picks its replicas (by the names they answer Info with), once it
    is connected to all of them: "ready" means one replica, not all. The next call goes to the cycle's first."""
    from splitcomm.proto import trunk_pb2 as pb
    from splitcomm.proto import trunk_pb2_grpc as pb_grpc

    await channel.channel_ready()
    stub, seen, deadline = pb_grpc.TrunkStub(channel), [], time.monotonic() + 60
    while len(set(seen[-replicas:])) < replicas or len(seen) < 2 * replicas:  # twice round: a steady cycle
        if time.monotonic() > deadline:
            raise RuntimeError(f"the load reached {sorted(set(seen))} of {replicas} replicas in 60 s")
        seen.append((await stub.Info(pb.InfoRequest())).replica)
        if len(set(seen[-replicas:])) < replicas:
            await asyncio.sleep(0.05)
    return seen[-replicas:]


async def turn_to(channel, cycle: list[str], replica: str) -> None:
    """Turn a round-robin channel so that its next call goes to `replica`: an Info call per step of the cycle.
    Independent clients' round robins start at random replicas (four sessions over two replicas all land on one
    1 time in 8); the load spreads its sessions evenly instead, so that a run measures what its replicas serve."""
    from splitcomm.proto import trunk_pb2 as pb
    from splitcomm.proto import trunk_pb2_grpc as pb_grpc

    k = cycle.index(replica)
    for _ in range(k):
        await pb_grpc.TrunkStub(channel).Info(pb.InfoRequest())
    cycle[:] = cycle[k + 1 :] + cycle[: k + 1]  # the call that follows takes `replica`


def aio_worker(target, wire, n_sessions, prompt_h, step_hs, ready, go, done_steps, out, connections, first=0) -> None:
    """The same as `worker`, driven by asyncio over raw Session streams with messages encoded in advance: a load
    generator whose own cost (a sync gRPC client spends ~0.1-0.2 ms of Python per step) does not hide the
    server's capacity, as vLLM's benchmark clients do over HTTP. `connections`: "session", a channel of its own
    per session, as separate clients have; "process", one channel for all of the process's sessions. Over replicas,
    each channel balances as the project's client does (round robin over the healthy ones)."""

    import grpc

    from splitcomm import codec
    from splitcomm.proto import trunk_pb2 as pb
    from splitcomm.proto import trunk_pb2_grpc as pb_grpc

    torch.set_num_threads(1)
    with TrunkClient(TrunkClientConfig(target)) as client:
        fp = client.info().fingerprint
    dtype = getattr(torch, wire)
    opening = pb.StepRequest(open=pb.SessionOpen(fingerprint=fp, max_length=prompt_h.shape[1] + step_hs.shape[0] + 1))
    prefill = pb.StepRequest(step=pb.Step(step=0, hidden=codec.encode(prompt_h, dtype)))
    steps = [
        pb.StepRequest(step=pb.Step(step=i + 1, hidden=codec.encode(x.unsqueeze(0), dtype)))
        for i, x in enumerate(step_hs)
    ]

    async def exchange(call, req):
        await call.write(req)
        resp = await call.read()
        if resp is grpc.aio.EOF:
            raise RuntimeError(f"session ended: {await call.code()} {await call.details()}")
        return resp

    async def main() -> None:
        own = [("grpc.use_local_subchannel_pool", 1)] if connections == "session" else []
        uri, options = channel_args(target, health_service=SERVICE_NAME)
        channels = [grpc.aio.insecure_channel(uri, options=options + own) for _ in range(n_sessions if own else 1)]
        replicas = len(target.split(","))
        cycles = [await replica_cycle(channel, replicas) for channel in channels]
        order = sorted(cycles[0])
        try:
            calls = []
            for i in range(n_sessions):  # one by one: each opens where its turn says before the next is picked
                channel, cycle = channels[i % len(channels)], cycles[i % len(channels)]
                await turn_to(channel, cycle, order[(first + i) % replicas])
                call = pb_grpc.TrunkStub(channel).Session()
                await call.write(opening)
                await exchange(call, prefill)
                calls.append(call)
            ready.put(n_sessions)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)

            async def run(call):
                lat, start = [], time.monotonic()
                for req in steps:
                    t0 = time.perf_counter()
                    await exchange(call, req)
                    lat.append((time.perf_counter() - t0) * 1e3)
                    with done_steps.get_lock():
                        done_steps.value += 1
                end = time.monotonic()
                await call.done_writing()
                return lat, start, end

            out.put(await asyncio.gather(*(run(c) for c in calls)))
        finally:
            for channel in channels:
                await channel.close()

    asyncio.run(main())


def newcomer_ttft(client: TrunkClient, fp, prompt_h: torch.Tensor, wire: torch.dtype) -> float:
    """Open a session and send its prompt: ms to the trunk's answer (its share of the time to first token)."""
    t0 = time.perf_counter()
    with client.session(fp, prompt_h.shape[1] + 1, wire) as s:
        s.step(prompt_h)
        return (time.perf_counter() - t0) * 1e3


SCRAPED = ("trunk_decode_batch_rows_count", "trunk_decode_batch_rows_sum", "trunk_compute_seconds_total")
SCRAPED += ('trunk_steps_total{kind="decode"}',)


def scrape(port: int) -> dict[str, float]:
    """A replica's Prometheus metrics that the table reads: decode batches, their rows, compute seconds, decode
    steps."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    got = {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.split(" ")[0] in SCRAPED)}
    return {k: got.get(k, 0.0) for k in SCRAPED}


def thread_cpu(pid: int) -> dict[str, float] | None:
    """CPU seconds each thread of process `pid` has used, summed by the thread's name in the operating system (the
    server names its own: grpc-loop, trunk-scheduler); None where there is no /proc."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return None
    hz, out = os.sysconf("SC_CLK_TCK"), collections.Counter()
    for tid in tasks.iterdir():
        try:
            name = (tid / "comm").read_text().strip()
            fields = (tid / "stat").read_text().rsplit(")", 1)[1].split()  # utime, stime: fields 14 and 15
        except OSError:  # the thread ended meanwhile
            continue
        out[name] += (int(fields[11]) + int(fields[12])) / hz
    return out


def host_busy() -> float | None:
    """CPU seconds the host's cores have been busy (not idle, not waiting for I/O) since boot, all of them
    together; None where there is no /proc."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # user .. steal, less idle and iowait


def cpu_now(server_pids: list[int], client_pids: list[int]) -> tuple:
    """What `cpu_shares` compares: the replicas' threads (summed by name), the load's client processes, the
    host."""
    servers, threads = [thread_cpu(pid) for pid in server_pids], collections.Counter()
    for x in servers:  # update, not +: a Counter sum drops the threads /proc has counted no tick for yet
        threads.update(x or {})
    threads = None if None in servers else threads
    clients = [thread_cpu(pid) for pid in client_pids]
    used = None if None in clients else sum(sum(c.values()) for c in clients)
    return threads, used, host_busy()


def cpu_shares(before: tuple, after: tuple, seconds: float, steps: int) -> dict:
    """CPU over a run, in cores: the replicas' event loops, their schedulers, all of their threads; the load's
    client processes and the whole host (of os.cpu_count() cores: near it, the host is the bound, not the server);
    and the CPU time of the event loops per decode step served, µs (what bounds a server where its loop is busy).
    None for what /proc could not say."""
    (threads0, *totals0), (threads1, *totals1) = before, after
    pairs = zip(totals0, totals1, strict=True)
    clients, host = (None if a is None or b is None else (b - a) / seconds for a, b in pairs)
    out = {"clients_cpu": clients, "host_cpu": host}
    if threads0 is None or threads1 is None:
        return out | {"loop_cpu": None, "scheduler_cpu": None, "server_cpu": None, "thread_cpu": {}}
    used = {k: (v - threads0.get(k, 0.0)) / seconds for k, v in threads1.items()}
    return out | {
        "loop_cpu": used.get("grpc-loop", 0.0),
        "loop_us_per_step": used.get("grpc-loop", 0.0) * seconds / steps * 1e6,
        "scheduler_cpu": used.get("trunk-scheduler", 0.0),
        "server_cpu": sum(used.values()),
        "thread_cpu": {k: round(v, 3) for k, v in sorted(used.items())},  # (/proc counts in 10 ms ticks)
    }


def run_load(target, args, n: int, prompt_h, step_hs, fp, metrics_ports: list[int], server_pids: list[int]) -> dict:
    ctx = mp.get_context("spawn")
    procs_n = max(1, min(n, args.client_procs))
    shares = [n // procs_n + (i < n % procs_n) for i in range(procs_n)]
    ready, out, go, done = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("i", 0)
    target_fn = aio_worker if args.clients == "aio" else worker
    procs = [
        ctx.Process(
            target=target_fn,
            args=(target, args.wire_dtype, k, prompt_h, step_hs, ready, go, done, out)
            + ((args.connections, sum(shares[:j])) if args.clients == "aio" else ()),
        )
        for j, k in enumerate(shares)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    client = TrunkClient(TrunkClientConfig(target))
    cpu_before = cpu_now(server_pids, [p.pid for p in procs])
    before, t_before = [scrape(port) for port in metrics_ports], time.monotonic()
    go.set()
    total = n * step_hs.shape[0]
    while done.value < total // 4:  # a newcomer arrives while the N are well into decoding
        time.sleep(0.002)
    ttft = newcomer_ttft(client, fp, prompt_h, getattr(torch, args.wire_dtype))
    newcomer_during = done.value < total
    results = [r for _ in procs for r in out.get(timeout=600)]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    cpu_after = cpu_now(server_pids, [p.pid for p in procs])  # before they end: their /proc goes with them
    cpu = cpu_shares(cpu_before, cpu_after, time.monotonic() - t_before, total)
    # each replica's share over the run (the newcomer's prefill is in there too)
    each = [{k: v - b[k] for k, v in scrape(port).items()} for port, b in zip(metrics_ports, before, strict=True)]
    after = {k: sum(e[k] for e in each) for k in SCRAPED}
    decode = 'trunk_steps_total{kind="decode"}'
    spread = [e[decode] / max(1.0, after[decode]) for e in each]
    for p in procs:
        p.join(timeout=60)
    client.close()
    lat = [x for r in results for x in r[0]]
    return {
        "mean_batch": after["trunk_decode_batch_rows_sum"] / max(1.0, after["trunk_decode_batch_rows_count"]),
        "busy_share": after["trunk_compute_seconds_total"] / wall / len(metrics_ports),  # of each replica's device
        "replica_step_shares": spread,  # of the decode steps, the share each replica served
        "sessions": n,
        "tokens_per_s": total / wall,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "newcomer_ttft_ms": ttft,
        "newcomer_during_decode": newcomer_during,
        "client_processes": procs_n,
        "clients": args.clients,
        "connections": args.connections if args.clients == "aio" else "process",
    } | cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--sessions", type=numbers(int, 1), default="1,2,4,8,16,32,64", help="N, comma-separated")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens of each session")
    p.add_argument("--steps", type=int, default=64, help="decode steps of each session")
    p.add_argument("--device", default="cpu", help="the server's device: cpu, cuda, auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the server's --batch-wait-ms (its default)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--unbatched", action="store_true", help="also run every N with --max-batch 1")
    p.add_argument(
        "--replicas",
        type=numbers(int, 1),
        default="1",
        help="trunk server processes, the load spread over them; comma-separated to run each side by side (1,2)",
    )
    p.add_argument(
        "--through",
        default="client",
        help="how clients reach several replicas: client (the list, the client's round robin), nginx "
        "(deploy/nginx.conf, one address), or both, comma-separated",
    )
    p.add_argument("--client-procs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--clients",
        default="aio",
        choices=["aio", "library"],
        help="aio: asyncio streams replaying encoded messages (the server's capacity); library: TrunkClient "
        "sessions in threads (what the project's own client adds)",
    )
    p.add_argument(
        "--connections",
        default="session",
        choices=["session", "process"],
        help="aio clients: a connection per session, as separate clients have (default), or one per client process",
    )
    p.add_argument(
        "--event-loop", default="auto", help="the server's --event-loop; comma-separated to run each side by side"
    )
    p.add_argument(
        "--switch-interval-ms",
        type=numbers(float, empty=True),
        default="",
        help="the server's --switch-interval-ms (its default; 0: Python's 5 ms); comma-separated to run each side "
        "by side",
    )
    p.add_argument(
        "--simulate-device-ms",
        type=float,
        default=None,
        help="decode batches on a simulated device taking this long whatever the rows (scripts/simulated_server.py)",
    )
    p.add_argument("--quick", action="store_true", help="N = 1, 2, 4, 8 and 24 steps")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.sessions, args.steps = [1, 2, 4, 8], 24
    ns, switches = args.sessions, args.switch_interval_ms or [None]
    loops = [x.strip() for x in args.event_loop.split(",") if x.strip()]
    if not loops:
        p.error("--event-loop needs at least one value")
    throughs = [x.strip() for x in args.through.split(",") if x.strip()]
    if not throughs or set(throughs) - {"client", "nginx"}:
        p.error("--through takes client, nginx or both, comma-separated")
    prompt_h, step_hs = hidden_states(args.model, args.models_dir, args.prompt, args.steps)
    configs = {}
    for r, via, loop, sw in itertools.product(args.replicas, throughs, loops, switches):
        if r == 1 and via != throughs[0]:
            continue  # one replica is reached directly
        name = f"{r} replica" + "s" * (r > 1) + ("" if r == 1 or via == "client" else f" via {via}")
        name += "" if len(loops) == 1 else f", {loop}"
        name += "" if len(switches) == 1 else f", switch {sw:g} ms" if sw else ", switch 5 ms"
        configs[name] = (args.max_batch, r, via, loop, sw)
    configs |= {"unbatched": (1, 1, "client", loops[0], switches[0])} if args.unbatched else {}
    rows, t0 = [], time.perf_counter()
    for name, (max_batch, replicas, via, loop, sw) in configs.items():
        flags = ["--device", args.device, "--dtype", args.dtype, "--max-batch", str(max_batch)]
        flags += ["--event-loop", loop]
        flags += [] if sw is None else ["--switch-interval-ms", str(sw)]
        flags += ["--kv-slots", str(max(ns) + 2), "--max-session-tokens", str(args.prompt + args.steps + 2)]
        flags += ["--max-sessions", str(max(ns) + 8), "--metrics-host", "127.0.0.1"]
        if args.batch_wait_ms is not None:
            flags += ["--batch-wait-ms", str(args.batch_wait_ms)]
        entry = ("-m", "server")
        if args.simulate_device_ms is not None:
            entry = (str(ROOT / "scripts" / "simulated_server.py"), "--device-ms", str(args.simulate_device_ms))
        ports = [free_port() for _ in range(replicas)]
        servers, proxy = [], None
        try:
            for port in ports:
                servers.append(
                    start_server(args.model, args.models_dir, None, flags + ["--metrics-port", str(port)], entry)
                )
            target = ",".join(t for _, t in servers)
            if via == "nginx" and replicas > 1:
                proxy = Nginx([t for _, t in servers])
                target = proxy.address
            client = TrunkClient(TrunkClientConfig(target))
            fp = client.info().fingerprint
            wire = getattr(torch, args.wire_dtype)
            newcomer_ttft(client, fp, prompt_h, wire)  # warm-up
            idle = statistics.median(newcomer_ttft(client, fp, prompt_h, wire) for _ in range(5))
            info = client.info()
            client.close()
            for n in ns:
                r = run_load(target, args, n, prompt_h, step_hs, fp, ports, [p.pid for p, _ in servers])
                r |= {"config": name, "replicas": replicas, "through": via, "idle_ttft_ms": idle}
                rows.append(r)
                if args.json:  # as it goes: a run cut short (a time limit) keeps what it measured
                    save(args.json, {"model": args.model, "command": " ".join(sys.argv), "rows": rows} | PARTIAL)
                print(
                    f"  {name} N={n}: {r['tokens_per_s']:.1f} tok/s, p50 {r['p50_ms']:.2f} ms, "
                    f"newcomer TTFT {r['newcomer_ttft_ms']:.1f} ms (idle {idle:.1f}), spread "
                    f"{'/'.join(f'{x:.0%}' for x in r['replica_step_shares'])}",
                    file=sys.stderr,
                )
        finally:
            if proxy is not None:
                proxy.stop()
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)
    machine = (
        f"{info.device} {info.dtype}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
    )
    if info.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    if args.simulate_device_ms is not None:
        machine += f"; decode batches on a SIMULATED device of {args.simulate_device_ms:g} ms a batch"
    print(
        f"\nmodel {args.model}, trunk blocks 2-9 on {machine}; prompt {args.prompt}, {args.steps} decode steps a "
        f"session, {args.wire_dtype} wire, {args.clients} clients; measured in {time.perf_counter() - t0:.0f} s\n"
    )
    print(
        "| config | sessions | tokens/s | x one | x 1 replica | p50 ms | p50 x one | p99 ms | newcomer TTFT ms "
        "| x idle | mean batch | compute busy | spread | loop CPU | loop µs/step | server CPU | clients CPU "
        "| host CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        one = next(x for x in rows if x["config"] == r["config"] and x["sessions"] == ns[0])
        r["x_one"] = r["tokens_per_s"] / one["tokens_per_s"]
        alone = [x for x in rows if x["replicas"] == 1 and x["sessions"] == r["sessions"]]  # at the same N
        r["x_one_replica"] = r["tokens_per_s"] / alone[0]["tokens_per_s"] if alone else None
        r["p50_x_one"] = r["p50_ms"] / one["p50_ms"]
        r["ttft_x_idle"] = r["newcomer_ttft_ms"] / r["idle_ttft_ms"]
        print(
            f"| {r['config']} | {r['sessions']} | {r['tokens_per_s']:,.1f} | {r['x_one']:.2f} | "
            f"{'-' if r['x_one_replica'] is None else format(r['x_one_replica'], '.2f')} | {r['p50_ms']:.2f} | "
            f"{r['p50_x_one']:.2f} | {r['p99_ms']:.2f} | {r['newcomer_ttft_ms']:.1f} | {r['ttft_x_idle']:.2f} | "
            f"{r['mean_batch']:.1f} | {r['busy_share']:.0%} | {'/'.join(f'{x:.0%}' for x in r['replica_step_shares'])} "
            f"| {cores(r['loop_cpu'])} | {us(r.get('loop_us_per_step'))} | {cores(r['server_cpu'])} | "
            f"{cores(r['clients_cpu'])} | {cores(r['host_cpu'])} |"
        )
    out = {"model": args.model, "machine": machine, "command": " ".join(sys.argv), "rows": rows, "complete": True}
    if args.json:
        save(args.json, out)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(rows, args.plot)


PARTIAL = {"complete": False}  # what a JSON written before the end of the run says


def save(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


def cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def us(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        print("no plot: plotly is not installed here", file=sys.stderr)
        return
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens/s served", "per-step latency p50 / p99 (ms)"))
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]
        n = [r["sessions"] for r in rs]
        fig.add_trace(go.Scatter(x=n, y=[r["tokens_per_s"] for r in rs], name=f"{name} tokens/s"), row=1, col=1)
        fig.add_trace(go.Scatter(x=n, y=[r["p50_ms"] for r in rs], name=f"{name} p50"), row=1, col=2)
        fig.add_trace(
            go.Scatter(x=n, y=[r["p99_ms"] for r in rs], name=f"{name} p99", line={"dash": "dot"}), row=1, col=2
        )
    fig.update_xaxes(type="log", title="concurrent sessions")
    fig.update_layout(template="plotly_white", title="Trunk server under load")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
