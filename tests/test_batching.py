"""Many sessions, one trunk: decode steps of concurrent sessions batched into one forward over real gRPC give
each session what it gets alone; slots are taken, given back and refused cleanly; metrics and monitor samples
say what the scheduler did."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import urllib.request

import grpc
import psutil
import pytest
import torch

from server.runtime import TrunkRuntime
from splitcomm.errors import TrunkError
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.proto import trunk_pb2_grpc as pb_grpc
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.parts import load_parts
from tests.conftest import free_port, start_tiny_server, tiny_split_engine, wait_for

PROMPTS = [
    "The history of natural language processing",
    "Once upon a time",
    "In the beginning God created the heaven and the earth. And the earth was without form",
    "GPT-2",
    "Split learning keeps the data on the client while",
    "A",
    "The quick brown fox jumps over the lazy dog, and then",
    "Hidden states cross the wire",
]


@pytest.fixture(scope="module")
def batching_server(models_dir, tiny):
    # a long wait, so that steps of sessions that are decoding meet in one batch on a busy 2-core machine
    srv = start_tiny_server(
        models_dir,
        max_sessions=24,
        kv_slots=20,
        batch_wait_ms=50,
        grace_s=0.5,
        metrics_port=free_port(),
    )
    yield srv
    srv.stop(0.5)


def _greedy(engine, prompt: str, n: int) -> tuple[list[int], list[torch.Tensor]]:
    stepper = engine.new_stepper(64)
    chunk, tokens, logits = torch.tensor([engine.encode(prompt)]), [], []
    for _ in range(n):
        out = stepper.step(chunk).logits.float()
        logits.append(out.clone())
        tokens.append(int(out.argmax()))
        chunk = torch.tensor([[tokens[-1]]])
    stepper.close()
    return tokens, logits


def greedy_together(engine, jobs: list[tuple[str, int]]) -> list:
    """`_greedy` of every (prompt, tokens) job at once, one thread each, all starting together."""
    together: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait()
        together[i] = _greedy(engine, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return together


def assert_alike(alone: list, together: list) -> None:
    """The same greedy tokens, and logits within 1e-5, batched as alone."""
    worst = 0.0
    for (tokens, logits), (tokens_b, logits_b) in zip(alone, together, strict=True):
        assert tokens_b == tokens
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(logits, logits_b, strict=True)))
    assert worst <= 1e-5


@pytest.mark.slow
def test_sixteen_batched_sessions_get_what_they_get_alone(models_dir, batching_server):
    srv = batching_server
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}")
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 12 + i % 5) for i in range(16)]
    alone = [_greedy(engine, p, n) for p, n in jobs]  # one at a time: every decode step a batch of one
    before = dict(srv.runtime.stats.batch_sizes)
    assert set(before) == {1}

    together = greedy_together(engine, jobs)
    sizes = {n: k - before.get(n, 0) for n, k in srv.runtime.stats.batch_sizes.items() if k > before.get(n, 0)}
    assert max(sizes) >= 4, sizes  # the steps did meet in batches
    assert_alike(alone, together)
    engine.close()
    wait_for(lambda: srv.sessions.active() == 0 and srv.runtime.used_slots() == 0, what="sessions and slots freed")


def test_cancelled_session_frees_its_slot_and_disturbs_no_one(batching_server, tiny):
    srv = batching_server
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
    fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
    gen = torch.Generator().manual_seed(5)
    inputs = [
        [torch.randn(1, 3 + i, 64, generator=gen)] + [torch.randn(1, 1, 64, generator=gen) for _ in range(10)]
        for i in range(4)
    ]
    results: dict[int, list[torch.Tensor]] = {}
    victim_started = threading.Event()

    def run(i: int) -> None:
        session = client.session(fp, 40)
        outs = []
        try:
            for j, x in enumerate(inputs[i]):
                outs.append(session.step(x)[0])
                if i == 0 and j == 4:
                    victim_started.set()
                    session._stream._call.cancel()  # gone mid-generation, its next step never comes
                    return
        finally:
            results[i] = outs
            session.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert victim_started.is_set() and len(results[0]) == 5
    for i in range(1, 4):  # the others got exactly what the trunk computes for them alone
        cache = trunk.new_cache()
        for x, got in zip(inputs[i], results[i], strict=True):
            assert float((trunk(x, cache) - got).abs().max()) <= 1e-5
    client.close()
    wait_for(lambda: srv.sessions.active() == 0 and srv.runtime.used_slots() == 0, what="slot of the cancelled freed")


def test_slots_used_up_is_resource_exhausted_naming_the_limit(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=8, kv_slots=2, grace_s=0.5)
    client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
    fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
    held = [client.session(fp, 20) for _ in range(2)]
    for s in held:
        s.step(torch.zeros(1, 2, 64))
    with pytest.raises(TrunkError, match=r"--kv-slots, is 2") as e:
        client.session(fp, 20).step(torch.zeros(1, 2, 64))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    held[0].close()
    wait_for(lambda: srv.runtime.used_slots() == 1, what="a slot given back")
    with client.session(fp, 20) as again:  # and taken again
        again.step(torch.zeros(1, 2, 64))
    held[1].close()
    client.close()
    srv.stop(0.5)


@pytest.mark.slow
def test_open_close_500_sessions_leaves_rss_flat(batching_server):
    srv = batching_server
    client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
    fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
    x, y = torch.randn(1, 6, 64), torch.randn(1, 1, 64)

    def cycle(n: int) -> None:
        for _ in range(n):
            with client.session(fp, 16) as s:
                s.step(x)
                s.step(y)

    procs = [psutil.Process()]
    cycle(50)  # warm-up: allocator pools, gRPC buffers, logging
    wait_for(lambda: srv.sessions.active() == 0, what="warm-up sessions closed")
    gc.collect()
    rss = [p.memory_info().rss for p in procs]
    cycle(500)
    wait_for(lambda: srv.sessions.active() == 0 and srv.runtime.used_slots() == 0, what="sessions closed")
    gc.collect()
    for p, before in zip(procs, rss, strict=True):
        grown = p.memory_info().rss - before
        assert grown < 20 * 2**20, f"RSS of pid {p.pid} grew {grown / 2**20:.1f} MiB over 500 sessions"
    client.close()


def test_metrics_and_monitor_report_batches_slots_and_errors(batching_server):
    srv = batching_server
    client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
    fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
    with client.session(fp, 16) as s:
        s.step(torch.randn(1, 4, 64))
        s.step(torch.randn(1, 1, 64))
        bad = pb.Fingerprint()
        with pytest.raises(TrunkError):
            client.session(bad, 16).step(torch.zeros(1, 1, 64))
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics.port}/metrics", timeout=10).read().decode()
        stub = pb_grpc.TrunkStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        samples = list(stub.Monitor(pb.MonitorRequest(interval_s=0.2, max_samples=2), timeout=10))

    def value(pattern: str) -> float:
        m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
        assert m, f"no {pattern} in the metrics"
        return float(m.group(1))

    assert value(r'trunk_steps_total\{kind="decode"\}') >= 1
    assert value(r'trunk_tokens_total\{kind="prefill"\}') >= 4
    assert value(r'trunk_kv_slots\{state="used"\}') >= 1
    assert value(r'trunk_errors_total\{code="INVALID_ARGUMENT"\}') >= 1
    assert value(r"trunk_decode_batch_rows_count") >= 1
    assert value(r"trunk_kv_slot_bytes") == srv.runtime.slot_bytes
    assert 0 < value(r"trunk_compute_seconds_total") <= srv.runtime.stats.compute_ms / 1e3
    # one count for each step that waited; cumulative "le" buckets
    edges = ("0.0005", "0.005", "1.0", "+Inf")
    waits = [value(rf'trunk_queue_wait_seconds_bucket\{{le="{re.escape(le)}"\}}') for le in edges]
    assert waits == sorted(waits) and waits[-1] == value("trunk_queue_wait_seconds_count") == srv.runtime.stats.waited
    assert value("trunk_queue_wait_seconds_sum") == pytest.approx(srv.runtime.stats.queue_wait_ms / 1e3, rel=1e-6)
    assert samples[-1].kv_slots_used >= 1 and samples[-1].kv_slots_used + samples[-1].kv_slots_free == 20
    client.close()


def test_prefill_runs_in_chunks_between_decode_batches(tiny):
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    rt = TrunkRuntime(trunk, slots=2, max_length=128, prefill_chunk=16, batch_wait_ms=0)
    x = torch.randn(1, 70, 64)

    async def main() -> tuple[torch.Tensor, list[str], int]:  # as the servicer uses the runtime: on an event loop
        a, b = rt.acquire_slot(), rt.acquire_slot()
        await rt.prefill_async(a, torch.randn(1, 5, 64))
        order: list[str] = []
        under_way, stop = asyncio.Event(), False

        async def decoding() -> None:
            while not stop:
                await rt.decode_async(a, torch.randn(1, 1, 64))
                order.append("d")
                if len(order) >= 2:
                    under_way.set()

        task = asyncio.ensure_future(decoding())
        await asyncio.wait_for(under_way.wait(), 30)
        jobs = rt.stats.jobs
        out, _ = await rt.prefill_async(b, x)
        order.append("p")
        stop = True
        await task
        return out, order, rt.stats.jobs - jobs

    try:
        out, order, jobs = asyncio.run(main())
        assert jobs == 5  # 70 positions in chunks of 16
        ref = trunk(x, trunk.new_cache())
        assert float((out - ref).abs().max()) <= 1e-5  # chunked equals whole
        assert order.count("d") >= 6  # decode steps went on while the prompt was computed
    finally:
        rt.stop()


def test_nothing_of_a_session_reaches_the_next_user_of_its_slot(tiny):
    """A session whose absurd (finite) input made NaN keys and values leaves its slot; the next session in that
    slot, batched with a longer one (so that its attention spans positions past its own length), gets what it
    gets alone: the slot is zeroed as far as the first session wrote."""
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    rt = TrunkRuntime(trunk, slots=4, max_length=64, batch_wait_ms=500)
    gen = torch.Generator().manual_seed(0)
    got: dict[int, list] = {}

    async def main() -> tuple:
        a = rt.acquire_slot()
        x = torch.full((1, 20, 64), 3e38)
        x[..., ::2] = -3e38
        out, _ = await rt.prefill_async(a, x)
        rt.release_slot(a)
        b, c = rt.acquire_slot(), rt.acquire_slot()
        assert b == a
        prompts = {b: torch.randn(1, 2, 64, generator=gen), c: torch.randn(1, 10, 64, generator=gen)}
        steps = {s: [torch.randn(1, 1, 64, generator=gen) for _ in range(4)] for s in (b, c)}
        for s in (b, c):
            await rt.prefill_async(s, prompts[s])

        async def run(slot: int) -> None:
            got[slot] = []
            for x in steps[slot]:
                h, ms, rows = await rt.decode_async(slot, x)
                got[slot].append((torch.as_tensor(h), ms, rows))

        await asyncio.gather(run(b), run(c))
        return out, b, prompts, steps

    try:
        out, b, prompts, steps = asyncio.run(main())
        assert out.isnan().any()  # what the first session sent poisons its own row
        assert any(rows == 2 for _, _, rows in got[b])  # b decoded in a batch with c, whose keys reach further
        cache = trunk.new_cache()
        trunk(prompts[b], cache)
        for x, (out, _, _) in zip(steps[b], got[b], strict=True):
            assert float((trunk(x, cache) - out).abs().max()) <= 1e-5
    finally:
        rt.stop()


def test_a_cancelled_awaiter_stays_until_its_work_has_run(tiny):
    """The servicer's task for a session may be cancelled (the client went away) while its step is in a batch: the
    task must not end, and so give the slot back, before the batch has run; then it ends cancelled."""

    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    rt = TrunkRuntime(trunk, slots=2, max_length=16)
    running, release = threading.Event(), threading.Event()

    def blocked() -> str:  # a piece of work that runs until the test lets it go
        running.set()
        release.wait(30)
        return "ran"

    async def main() -> list:
        seen = []
        task = asyncio.ensure_future(rt.run_timed_async(blocked))
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)
        task.cancel()
        await asyncio.sleep(0.05)
        seen.append(task.done())  # still waiting for its work
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            seen.append("cancelled")
        slot = rt.acquire_slot()
        out = (await rt.decode_async(slot, torch.randn(1, 1, 64)))[0]
        seen.append(float(torch.as_tensor(out).abs().sum()) > 0)  # the runtime goes on
        return seen

    try:
        assert asyncio.run(main()) == [False, "cancelled", True]
    finally:
        release.set()
        rt.stop()
