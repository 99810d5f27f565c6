"""gRPC fronts (`python -m server --fronts N`): processes that share the port and relay to the engine. What goes
through them is what goes to a server without them (the batching, limits, fuzz and TLS tests run both ways); here,
what is theirs alone: their processes, a front that dies, training through them, and their layering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
import torch

from client.train import LocalTrainer, SplitTrainer
from server.app import RESTART_AFTER_S
from splitcomm.errors import TrunkError, TrunkUnavailable
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.engine import FullEngine
from splitcore.sampling import SamplingParams
from splitcore.training import TextData
from tests.conftest import (
    ROOT,
    TINY,
    sigterm_another_thread,
    start_tiny_server,
    subprocess_env,
    tiny_split_engine,
    wait_for,
)
from tests.test_training import BAD, SETTINGS, _open, _raw_train

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def fronted(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=12, kv_slots=10, grace_s=0.5, fronts=2)
    yield srv
    srv.stop(0.5)


def test_stateless_and_session_generation_through_fronts_equal_the_full_model(models_dir, fronted, tiny):
    want = FullEngine(tiny, torch.device("cpu"), torch.float32).run("Through the front", 16, GREEDY).token_ids
    for kw in ({}, {"stateless": True}):
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}", **kw)
        assert engine.run("Through the front", 16, GREEDY).token_ids == want, kw
        engine.close()
    wait_for(lambda: fronted.sessions.active() == 0 and fronted.runtime.used_slots() == 0, what="sessions freed")


def test_split_training_through_fronts_equals_local_training(models_dir, fronted):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}")
    data = TextData.from_path(ROOT / "README.md", engine.encode, block=32)
    layers = list(engine.split.layers("trunk", engine.model.config.n_layer))
    local, split = LocalTrainer(engine.model, layers, SETTINGS), SplitTrainer(engine, SETTINGS, "none")
    try:
        for step in range(1, 4):
            batch = data.batch(step, 2, seed=0)
            a, b = local.step(step, batch), split.step(step, batch)
            assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss), (step, a.loss, b.loss)
        want, got = local.adapter(), split.adapter()
        assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-5
    finally:
        split.close()
        engine.close()
    wait_for(lambda: fronted.sessions.active() == 0, what="training session freed")


def test_a_front_that_dies_ends_its_own_sessions_only_and_is_started_again(models_dir, tiny, monkeypatch):
    import server.app
    import splitcomm.channel

    monkeypatch.setattr(server.app, "RESTART_AFTER_S", 0.0)  # it had served long enough to be started again

    options = splitcomm.channel.channel_options  # a connection per client (one process's channels share one)
    monkeypatch.setattr(
        splitcomm.channel, "channel_options", lambda *a: options(*a) + [("grpc.use_local_subchannel_pool", 1)]
    )
    srv = start_tiny_server(models_dir, max_sessions=20, kv_slots=16, grace_s=0.5, fronts=2)
    target = f"127.0.0.1:{srv.port}"
    try:
        fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
        # a client of its own per session: a connection each, which the kernel hands to one front or the other
        clients = [TrunkClient(TrunkClientConfig(target)) for _ in range(16)]
        sessions = [c.session(fp, 32) for c in clients]
        for s in sessions:
            s.step(torch.zeros(1, 3, 64))
        assert srv.runtime.used_slots() == 16
        victim = srv.fronts[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        alive = []
        for s in sessions:
            try:
                s.step(torch.zeros(1, 1, 64))
                alive.append(s)
            except TrunkError as e:  # its front has gone
                assert e.code == grpc.StatusCode.UNAVAILABLE
        assert 0 < len(alive) < len(sessions)  # both fronts had some (all on one: 2 in 65,536)
        # the engine freed the slots of the dead front's sessions; the others go on
        wait_for(lambda: srv.runtime.used_slots() == len(alive), what="the dead front's slots freed")
        for s in alive:
            s.step(torch.zeros(1, 1, 64))
        wait_for(lambda: srv.fronts[0].pid != victim.pid and srv.relay.stats.fronts == 2, 20, "the front again")
        engine = tiny_split_engine(models_dir, target)
        want = FullEngine(tiny, torch.device("cpu"), torch.float32).run("Still here", 8, GREEDY).token_ids
        assert engine.run("Still here", 8, GREEDY).token_ids == want
        engine.close()
        for s, c in zip(sessions, clients, strict=True):
            s.close()
            c.close()
        wait_for(lambda: srv.runtime.used_slots() == 0, what="every slot freed")
    finally:
        srv.stop(0.5)


def _start(*args: str, terminal: bool = False) -> tuple[subprocess.Popen, str]:
    """The server process; `terminal`: in a process group of its own, as a shell starts a command."""
    cmd = [sys.executable, "-m", "server", "--model", TINY, "--host", "127.0.0.1", "--device", "cpu", *args]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        start_new_session=terminal,
    )
    return p, p.stdout.readline()


def _end(p: subprocess.Popen) -> None:
    p.kill()
    p.communicate(timeout=30)  # and its pipes closed


def test_server_process_with_fronts_starts_stops_and_they_follow_it(tmp_path):
    p, line = _start("--port", "0", "--fronts", "2", "--log-file", str(tmp_path / "s.log"))
    try:
        assert "ready on 127.0.0.1:" in line and "2 gRPC fronts" in line, p.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split(":")[0])
        fronts = psutil.Process(p.pid).children()
        assert len(fronts) == 2 and all("server.front" in " ".join(f.cmdline()) for f in fronts)
        with TrunkClient(TrunkClientConfig(f"127.0.0.1:{port}")) as c:
            assert c.info().split_start == 2
        sigterm_another_thread(p.pid)
        assert p.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(fronts, timeout=10)
        assert not alive
    finally:
        _end(p)
    log = (tmp_path / "s.log").read_text()
    assert "front-0 serving" in log and "front-1 stopped" in log and "trunk server stopped" in log

    log = tmp_path / "ctrl-c.log"  # Ctrl-C in a terminal: SIGINT to the process group; the engine stops its fronts
    p, line = _start("--port", "0", "--fronts", "2", "--log-file", str(log), terminal=True)
    try:
        fronts = psutil.Process(p.pid).children()
        time.sleep(RESTART_AFTER_S + 0.5)  # a front that exited on its own now would be started again
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(fronts, timeout=10)
        assert not alive
    finally:
        _end(p)
    lines = log.read_text().splitlines()
    said = next(i for i, x in enumerate(lines) if "signal 2: shutting down" in x)
    assert not any("stopping" in x for x in lines[:said]), lines  # the fronts heard it from the engine, after it
    assert not any("starting it again" in x for x in lines)

    p, line = _start("--port", "0", "--fronts", "1")  # an engine that dies: its fronts stop too
    try:
        fronts = psutil.Process(p.pid).children()
        p.kill()
        p.wait()
        gone, alive = psutil.wait_procs(fronts, timeout=15)
        assert not alive
    finally:
        _end(p)


def test_fronts_on_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p, line = _start("--port", str(s.getsockname()[1]), "--fronts", "2")
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2 and line == ""
    last = err.strip().splitlines()[-1]  # after the model's first build, if this test is the first to load it
    assert last.startswith("error: cannot bind 127.0.0.1:") and "in use" in last and "Traceback" not in err


def test_a_front_loads_neither_torch_nor_the_model():
    code = "import sys, server.front; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_a_client_cancelled_mid_session_frees_its_slot_on_the_engine(fronted):
    fp = pb.Fingerprint(**fronted.fingerprint.to_dict(), digest=fronted.fingerprint.digest)
    client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{fronted.port}"))
    s = client.session(fp, 32)
    s.step(torch.zeros(1, 4, 64))
    assert fronted.runtime.used_slots() == 1
    s._stream._call.cancel()
    wait_for(lambda: fronted.runtime.used_slots() == 0 and fronted.sessions.active() == 0, what="slot freed")
    with pytest.raises(TrunkUnavailable):
        s.step(torch.zeros(1, 1, 64))
    client.close()
    assert os.path.exists(fronted._engine_dir)


def test_a_session_cancelled_with_a_step_in_flight_keeps_its_slot_until_the_step_has_run(models_dir, tiny):
    """A relayed decode step runs with no task of its own: the session's task, cancelled meanwhile, must still wait
    for it before the slot goes back (another session could get the slot while the step writes to it)."""
    from scripts.simulated_server import SimulatedDevice

    srv = start_tiny_server(models_dir, max_sessions=4, kv_slots=2, grace_s=0.5, fronts=1)
    rt = srv.runtime
    rt.trunk = SimulatedDevice(rt.trunk, 400.0)  # a decode batch takes 0.4 s; a prefill runs on the model
    released = []
    release = rt.release_slot

    def checked_release(slot: int) -> None:
        with rt._cv:
            released.append((slot, slot in rt._flying or any(slot in w.slots for w in rt._decodes)))
        release(slot)

    rt.release_slot = checked_release
    try:
        fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
        client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
        s = client.session(fp, 32)
        s.step(torch.zeros(1, 3, 64))
        errors = []

        def step() -> None:
            try:
                s.step(torch.zeros(1, 1, 64))
            except TrunkError as e:
                errors.append(e)

        t = threading.Thread(target=step)
        t.start()
        wait_for(lambda: rt._flying, what="the decode step in flight")
        s._stream._call.cancel()
        t.join(10)
        wait_for(lambda: released, what="the slot given back")
        assert released == [(0, False)]  # given back, with nothing of its session queued or running
        assert errors and rt.stats.batches == 1
        client.close()
    finally:
        srv.stop(0.5)


def test_a_relayed_step_refused_by_a_stopping_runtime_is_unavailable(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=4, kv_slots=2, grace_s=0.5, fronts=1)
    try:
        fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
        client = TrunkClient(TrunkClientConfig(f"127.0.0.1:{srv.port}"))
        s = client.session(fp, 32)
        s.step(torch.zeros(1, 3, 64))
        s.step(torch.zeros(1, 1, 64))
        srv.runtime.stop()  # what the server's stop does, after its grace
        with pytest.raises(TrunkError, match="shutting down") as e:
            s.step(torch.zeros(1, 1, 64))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: srv.runtime.used_slots() == 0, what="slot freed")
        client.close()
    finally:
        srv.stop(0.5)


@pytest.mark.parametrize("case", list(BAD))
def test_training_errors_come_through_a_front_as_they_are(models_dir, fronted, case):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}")
    first, *rest = BAD[case][0]
    got, code, details = _raw_train(f"127.0.0.1:{fronted.port}", [_open(engine, **first), *rest])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and BAD[case][1] in details, (code, details)
    engine.close()
    wait_for(lambda: fronted.sessions.active() == 0, what="refused training session freed")


def test_a_training_session_cancelled_at_a_front_is_freed_on_the_engine(models_dir, fronted):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}")
    split = SplitTrainer(engine, SETTINGS)
    split.remote.forward(1, torch.zeros(2, 32, 64))  # activations kept for a backward that never comes
    assert fronted.sessions.active() == 1
    split.remote._stream._call.cancel()
    wait_for(lambda: fronted.sessions.active() == 0, what="training session gone after a cancel")
    engine.close()


def test_speculative_decoding_through_fronts_equals_plain(models_dir, fronted, tiny):
    """Speculation rolls the trunk's cache back (truncate_to) and verifies several tokens a step: the steps that
    take the servicer's usual path, between decode steps that start at once."""
    want = FullEngine(tiny, torch.device("cpu"), torch.float32).run("Once upon a time", 30, GREEDY).token_ids
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}")
    for source in ("lookup", "self"):
        spec = engine.run("Once upon a time", 30, GREEDY, speculate=source)
        assert spec.token_ids == want, source
        assert spec.stats.speculation.accepted > 0  # drafts were taken, and rolled back where refused
    engine.close()
    wait_for(lambda: fronted.sessions.active() == 0 and fronted.runtime.used_slots() == 0, what="sessions freed")


def test_a_client_that_floods_its_session_is_held_back_at_the_front(models_dir, tiny):
    """Without fronts gRPC's flow control holds back a client that sends steps faster than they run; a front reads
    them for the relay, so it must hold them back itself: a session's unanswered steps stay at AHEAD or fewer."""
    from scripts.simulated_server import SimulatedDevice
    from server.front import AHEAD
    from splitcomm.codec import encode
    from splitcomm.proto import trunk_pb2_grpc as pb_grpc

    srv = start_tiny_server(models_dir, max_sessions=4, kv_slots=2, grace_s=0.5, fronts=1)
    srv.runtime.trunk = SimulatedDevice(srv.runtime.trunk, 200.0)  # a decode batch takes 0.2 s
    fp = pb.Fingerprint(**srv.fingerprint.to_dict(), digest=srv.fingerprint.digest)
    steps = 40
    msgs = [pb.StepRequest(open=pb.SessionOpen(fingerprint=fp, max_length=steps + 8))]
    msgs += [pb.StepRequest(step=pb.Step(step=0, hidden=encode(torch.zeros(1, 3, 64))))]
    msgs += [pb.StepRequest(step=pb.Step(step=i, hidden=encode(torch.zeros(1, 1, 64)))) for i in range(1, steps)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            call = pb_grpc.TrunkStub(channel).Session(iter(msgs), timeout=60)  # all sent at once, none awaited
            first = next(call)
            assert first.step == 0
            wait_for(lambda: srv.relay.stats.items_in >= 2 + AHEAD, what="the first steps relayed")
            time.sleep(0.5)  # a front that did not hold back would have relayed all 40 by now
            answered = srv.runtime.stats.batches + 1
            assert srv.relay.stats.items_in <= 2 + answered + AHEAD, (srv.relay.stats, answered)
            call.cancel()
        wait_for(lambda: srv.runtime.used_slots() == 0, 10, "slot freed")
    finally:
        srv.stop(0.5)


def test_an_adapter_trained_and_used_through_fronts_generates_as_the_full_model(models_dir, fronted, tiny, tmp_path):
    """Training through a front (passed through), then generation with the adapter on the trunk (a relayed session
    whose steps all take the servicer's usual path: they run with the session's adapter, alone)."""
    from client.train import Run, TrainConfig

    engine = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}")
    cfg = TrainConfig(steps=6, eval_every=0, eval_batches=1, batch_size=4, block_size=32, lora_rank=4, lr=3e-2)
    cfg.out = str(tmp_path / "adapter")
    data = TextData.from_path(ROOT / "README.md", engine.encode, block=32)
    trainer = SplitTrainer(engine, cfg.lora())
    list(Run(trainer, data, cfg, "random:tiny"))
    trainer.close()
    engine.close()
    split = tiny_split_engine(models_dir, f"127.0.0.1:{fronted.port}", adapter=cfg.out)
    full = FullEngine(tiny, torch.device("cpu"), torch.float32, adapter=cfg.out)
    got = split.run("Once upon a time", 20, GREEDY).token_ids
    assert got == full.run("Once upon a time", 20, GREEDY).token_ids
    split.use_adapter = full.use_adapter = False
    base = split.run("Once upon a time", 20, GREEDY).token_ids
    assert base == full.run("Once upon a time", 20, GREEDY).token_ids and base != got  # the adapter did change it
    split.close()
    wait_for(lambda: fronted.sessions.active() == 0, what="sessions freed")


def test_the_engine_knows_the_client_of_a_call_a_front_passed_on(models_dir, fronted, server):
    """The engine registers and logs the client's address for a training session that came through a front (its
    transport peer is the front's Unix socket); a call over TCP cannot claim another address that way."""
    for srv, through_front in ((fronted, True), (server, False)):
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}")
        trainer = SplitTrainer(engine, SETTINGS)
        trainer.remote.forward(1, torch.zeros(2, 32, 64))
        (session,) = list(srv.sessions._sessions.values())
        assert session.peer.startswith("ipv4:127.0.0.1:"), (through_front, session.peer)
        trainer.close()
        engine.close()
        wait_for(lambda srv=srv: srv.sessions.active() == 0, what="training session freed")
    from server.status import peer

    class Context:
        def __init__(self, address):
            self.address = address

        def peer(self):
            return self.address

        def invocation_metadata(self):
            return (("x-gpt2split-peer", "ipv4:10.0.0.7:5555"),)

    assert peer(Context("unix:")) == "ipv4:10.0.0.7:5555"  # from a front, over the engine's socket
    assert peer(Context("ipv4:127.0.0.1:4444")) == "ipv4:127.0.0.1:4444"  # a client's claim over TCP is not taken


def test_a_front_that_dies_at_once_is_not_started_again(models_dir, tiny):
    """A front that exits within RESTART_AFTER_S of starting would only exit again: it is left down, said so."""
    srv = start_tiny_server(models_dir, max_sessions=4, kv_slots=2, grace_s=0.5, fronts=2)
    try:
        victim = srv.fronts[0]
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: srv.relay.stats.fronts == 1, what="the engine sees it gone")
        time.sleep(0.5)
        assert srv.fronts[0] is victim and srv.relay.stats.fronts == 1
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}")  # the other serves
        assert len(engine.run("Still", 4, GREEDY).token_ids) == 4
        engine.close()
    finally:
        srv.stop(0.5)


def _read_order(batches) -> list[tuple[int, object]]:
    """(stream, what) in the order the other end reads a relay: each batch's items, then its rows."""
    order = []
    for b in batches:
        order += [(it.stream, it.message or "end") for it in b.items]
        order += [(s, ("row", step)) for r in b.rows for s, step in zip(r.stream, r.step, strict=True)]
    return order


def test_the_outbox_keeps_each_streams_order_across_items_and_rows(monkeypatch):
    """A batch is read items first, then rows: an item, or a second row, of a stream after a row of it must start a
    new batch, or the other end would read them out of order (a session's end before its last step)."""
    import asyncio

    import server.relay
    from server.relay import Outbox

    puts = [
        ("item", 1, b"open"),
        ("row", 1, 5),
        ("row", 2, 7),
        ("row", 3, 1),  # float16: a group of its own
        ("item", 1, b""),  # stream 1's end, after its row
        ("row", 2, 8),  # stream 2's second row
        ("item", 3, b"rollback"),
        ("row", 4, 1),
    ]
    out = Outbox()
    for kind, stream, x in puts:
        if kind == "item":
            out.put(pb.RelayItem(stream=stream, message=x, has_message=bool(x), end=not x))
        else:
            wire = pb.FLOAT16 if stream == 3 else pb.FLOAT32
            out.put_row(stream, x, wire, 2, bytes([stream]) * (4 if stream == 3 else 8))
    out.close()

    async def drain(o):
        return [b async for b in o.batches()]

    batches = asyncio.run(drain(out))
    want = [(s, x or "end") if k == "item" else (s, ("row", x)) for k, s, x in puts]
    for stream in (1, 2, 3, 4):
        assert [w for w in _read_order(batches) if w[0] == stream] == [w for w in want if w[0] == stream], stream
    assert len(batches) == 2  # a new batch only where order needs one
    first = batches[0].rows
    assert [(r.dtype, list(r.stream), r.data) for r in first] == [
        (pb.FLOAT32, [1, 2], b"\x01" * 8 + b"\x02" * 8),
        (pb.FLOAT16, [3], b"\x03" * 4),
    ]

    monkeypatch.setattr(server.relay, "BATCH_BYTES", 20)  # a batch that would grow past the cap is closed first
    out = Outbox()
    for stream in range(1, 6):
        out.put_row(stream, 0, pb.FLOAT32, 2, b"\0" * 8)
    out.close()
    assert [len(b.rows[0].stream) for b in asyncio.run(drain(out))] == [2, 2, 1]


def test_a_front_packs_plain_decode_steps_only_and_the_engine_can_unpack_them():
    from server.relay import Outbox, plain_decode, unpacked
    from splitcomm.codec import encode

    def req(shape, dtype=torch.float32, **step):
        return pb.StepRequest(step=pb.Step(step=3, hidden=encode(torch.randn(shape).to(dtype)), **step))

    plain = [req((1, 1, 64)), req((1, 1, 64), torch.float16), req((1, 1, 32))]
    for r in plain:
        assert plain_decode(r.SerializeToString()) == (
            3,
            r.step.hidden.dtype,
            r.step.hidden.shape[2],
            r.step.hidden.data,
        )
    short = req((1, 1, 64))
    short.step.hidden.data = short.step.hidden.data[:-4]
    others = [
        req((1, 3, 64)),  # a prefill
        req((2, 1, 64)),  # several rows
        req((1, 1, 64), torch.bfloat16),
        req((1, 1, 64), truncate_to=2),  # a rollback
        short,
        pb.StepRequest(step=pb.Step(step=3, truncate_to=1)),  # a rollback alone
        pb.StepRequest(open=pb.SessionOpen(max_length=4)),
        pb.StepRequest(),
    ]
    for r in others:
        assert plain_decode(r.SerializeToString()) is None, r
    assert plain_decode(b"\xff\xff\xff") is None  # malformed: relayed as it is, for the engine to refuse

    out = Outbox()
    for i, r in enumerate(plain):
        out.put_row(i + 1, *plain_decode(r.SerializeToString()))
    batch = pb.RelayBatch.FromString(next(_batches(out)).SerializeToString())
    got = {s: unpacked(rows, i) for rows in batch.rows for i, s in enumerate(rows.stream)}
    assert [got[i + 1] for i in range(len(plain))] == plain


def _batches(out):
    import asyncio

    out.close()
    return iter(asyncio.run(_collect(out)))


async def _collect(out):
    return [b async for b in out.batches()]


def _stepwise(target: str, msgs: list[pb.StepRequest]):
    """A session stream that sends each step only once the one before it is answered (as a client decoding does):
    (the answers, status code, details)."""
    import queue

    from splitcomm.proto import trunk_pb2_grpc as pb_grpc

    q: queue.Queue = queue.Queue()
    q.put(msgs[0])  # the opening message: no answer
    got = []
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TrunkStub(channel).Session(iter(q.get, None), timeout=20)
        try:
            for m in msgs[1:]:
                q.put(m)
                got.append(next(call))
        except grpc.RpcError as e:
            return got, e.code(), e.details()
        finally:
            q.put(None)
    return got, grpc.StatusCode.OK, ""


def test_decode_steps_go_packed_and_give_what_they_give_without_fronts(fronted, server):
    """Plain decode steps cross the relay as rows, checked by the engine without their messages: their answers,
    and the refusals of those that cannot start at once (out of order, NaN, another width, past the session's
    length), are those of a server without fronts, field for field."""
    from splitcomm.codec import decode, encode

    fp = pb.Fingerprint(**server.fingerprint.to_dict(), digest=server.fingerprint.digest)
    torch.manual_seed(0)
    prompt, steps = torch.randn(1, 3, 64), [torch.randn(1, 1, 64) for _ in range(3)]

    def session(last: pb.Step, max_length: int = 16, wire=torch.float32) -> list[pb.StepRequest]:
        msgs = [pb.StepRequest(open=pb.SessionOpen(fingerprint=fp, max_length=max_length))]
        msgs += [pb.StepRequest(step=pb.Step(step=0, hidden=encode(prompt, wire)))]
        msgs += [pb.StepRequest(step=pb.Step(step=i + 1, hidden=encode(h, wire))) for i, h in enumerate(steps)]
        return msgs + [pb.StepRequest(step=last)]

    nan = torch.full((1, 1, 64), float("nan"))
    cases = {
        "good": session(pb.Step(step=4, hidden=encode(torch.randn(1, 1, 64)))),
        "float16": session(pb.Step(step=4, hidden=encode(torch.randn(1, 1, 64), torch.float16)), wire=torch.float16),
        "out of order": session(pb.Step(step=9, hidden=encode(torch.randn(1, 1, 64)))),
        "NaN": session(pb.Step(step=4, hidden=encode(nan))),
        "another width": session(pb.Step(step=4, hidden=encode(torch.randn(1, 1, 32)))),
        "past its length": session(pb.Step(step=4, hidden=encode(torch.randn(1, 1, 64))), max_length=6),
    }
    rows_before = fronted.relay.stats.rows_in
    books_before = (server.sessions.counters.total_steps, fronted.sessions.counters.total_steps)
    codes = {}
    for name, msgs in cases.items():
        want = _stepwise(f"127.0.0.1:{server.port}", msgs)
        got = _stepwise(f"127.0.0.1:{fronted.port}", msgs)
        assert got[1:] == want[1:], (name, got[1:], want[1:])
        codes[name] = got[1].name
        assert len(got[0]) == len(want[0]), name
        for a, b in zip(got[0], want[0], strict=True):
            fields = ("step", "cache_length")
            assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields], name
            assert (a.hidden.dtype, a.hidden.shape) == (b.hidden.dtype, b.hidden.shape), name
            assert torch.allclose(decode(a.hidden).float(), decode(b.hidden).float(), atol=1e-6), name
            assert 0 < a.server_ms <= a.server_wall_ms, name
    assert codes == {
        "good": "OK",
        "float16": "OK",
        "out of order": "INVALID_ARGUMENT",
        "NaN": "INVALID_ARGUMENT",
        "another width": "INVALID_ARGUMENT",
        "past its length": "RESOURCE_EXHAUSTED",
    }
    # the decode steps went as rows: three of each session, and the last of "good" and "float16"
    assert fronted.relay.stats.rows_in - rows_before >= len(cases) * 3 + 2
    # and were booked as steps, one each, as without fronts
    steps_run = server.sessions.counters.total_steps - books_before[0]
    assert fronted.sessions.counters.total_steps - books_before[1] == steps_run == len(cases) * 4 + 2
    wait_for(lambda: fronted.sessions.active() == 0 and fronted.runtime.used_slots() == 0, what="sessions freed")


def test_a_fronts_outbox_holds_a_batch_for_its_decoding_sessions_next_steps_up_to_the_engines_hold():
    """A front waits for the next step of each session it has just answered, so that they reach the engine in one
    relay batch, but no longer than the hold the engine gives it; a session that did not send in time is not
    waited for again until it is answered again."""
    import asyncio

    from server.relay import Outbox

    async def main():
        out = Outbox()
        out.hold_s = 0.3
        got: asyncio.Queue = asyncio.Queue()

        async def write():
            async for b in out.batches():
                await got.put((time.monotonic(), b))

        writer = asyncio.ensure_future(write())
        for stream in (1, 2, 3):
            out.want(stream)
        t0 = time.monotonic()
        out.put_row(1, 5, pb.FLOAT32, 2, b"\0" * 8)
        out.put_row(2, 5, pb.FLOAT32, 2, b"\0" * 8)
        await asyncio.sleep(0.05)
        assert got.empty()  # stream 3 has yet to send
        out.put(pb.RelayItem(stream=3, end=True))  # its end is its message: the batch is complete
        at, batch = await asyncio.wait_for(got.get(), 1)
        assert at - t0 < 0.25 and list(batch.rows[0].stream) == [1, 2] and batch.items[0].stream == 3

        for stream in (1, 2):
            out.want(stream)
        t0 = time.monotonic()
        out.put_row(1, 6, pb.FLOAT32, 2, b"\0" * 8)  # stream 2 never sends: the hold runs out
        at, batch = await asyncio.wait_for(got.get(), 2)
        assert 0.25 <= at - t0 < 1.0 and list(batch.rows[0].stream) == [1]
        t0 = time.monotonic()
        out.put_row(1, 7, pb.FLOAT32, 2, b"\0" * 8)  # nothing wanted now (stream 2 is forgotten): at once
        at, batch = await asyncio.wait_for(got.get(), 1)
        assert at - t0 < 0.2

        out.want(2)
        out.put_row(1, 8, pb.FLOAT32, 2, b"\0" * 8)
        await asyncio.sleep(0.05)
        out.close()  # a closing front does not hold its last batch
        at, batch = await asyncio.wait_for(got.get(), 1)
        assert list(batch.rows[0].step) == [8]
        await asyncio.wait_for(writer, 1)

    asyncio.run(main())
