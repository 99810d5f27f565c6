"""The trunk server over real gRPC on 127.0.0.1: correctness, bytes, sessions, monitoring, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitcomm.codec import encode
from splitcomm.errors import TrunkUnavailable
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.proto import trunk_pb2_grpc as pb_grpc
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.engine import FullEngine
from splitcore.errors import Mismatch
from splitcore.parts import load_parts
from splitcore.sampling import SamplingParams
from tests.conftest import (
    ROOT,
    free_port,
    sigterm_another_thread,
    start_server_process,
    subprocess_env,
    tiny_split_engine,
    wait_for,
)

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole"


@pytest.fixture(scope="module")
def engines(models_dir, server_target, tiny):
    def make(**kw):
        return tiny_split_engine(models_dir, server_target, **kw)

    made = {
        "session": make(),
        "stateless": make(stateless=True),
        "fp16": make(wire_dtype="float16"),
        "bf16": make(wire_dtype="bfloat16"),
    }
    yield made
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def full_engine(tiny):
    return FullEngine(tiny, torch.device("cpu"), torch.float32)


@torch.inference_mode()
def logit_diffs(engine, full_engine, prompt_ids, steps=32):
    """Per-step max |split - full| logit difference and whether greedy picks agree, stepping both in lockstep."""
    stepper = engine.new_stepper(len(prompt_ids) + steps + 3)
    full = full_engine.new_stepper(len(prompt_ids) + steps + 3)
    chunk = torch.tensor([prompt_ids])
    diffs, agree = [], []
    try:
        for i in range(steps + 1):
            ref = full.step(chunk).logits
            got = stepper.step(chunk).logits
            diffs.append(float((ref - got.float()).abs().max()))
            agree.append(int(ref.argmax()) == int(got.argmax()))
            chunk = torch.tensor([[int(ref.argmax())]]) if i < steps - 1 else torch.tensor([[464, 2068, 7586]])
    finally:
        stepper.close()
        full.close()
    return diffs, agree


@pytest.mark.parametrize("mode", ["session", "stateless"])
def test_split_over_grpc_matches_full_model(engines, full_engine, mode):
    engine = engines[mode]
    ids = engine.encode(PROMPT)
    diffs, _ = logit_diffs(engine, full_engine, ids)
    print(f"{mode}: max |logit diff| over {len(diffs)} steps = {max(diffs)}")
    assert max(diffs) == 0.0
    assert engine.run(PROMPT, 40, GREEDY).token_ids == full_engine.run(PROMPT, 40, GREEDY).token_ids


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
def test_half_precision_wire_measured(engines, full_engine, wire):
    ids = engines[wire].encode(PROMPT)
    diffs, agree = logit_diffs(engines[wire], full_engine, ids, steps=40)
    print(f"{wire} wire: max |logit diff| {max(diffs):.3g}, greedy agreement {sum(agree)}/{len(agree)}")
    assert 0 < max(diffs) < 0.5
    assert sum(agree) >= len(agree) - 2


def test_session_bytes_per_step_constant_in_context(engines, server):
    engine = engines["session"]
    result = engine.run(PROMPT, 60, GREEDY)
    s = result.stats.to_dict()
    d = server.trunk.config.n_embd
    decode_out, decode_in = s["bytes_out"][1:], s["bytes_in"][1:]
    assert len(set(decode_out)) == 1 and len(set(decode_in)) == 1, (set(decode_out), set(decode_in))
    assert 4 * d < decode_out[0] < 4 * d + 64 and 4 * d < decode_in[0] < 4 * d + 64
    assert s["bytes_out"][0] > 4 * d * len(result.prompt_token_ids)  # the prefill carries the whole prompt
    half = engines["fp16"].run(PROMPT, 5, GREEDY).stats.to_dict()
    assert half["bytes_out"][1] < decode_out[0] / 2 + 32


def test_stateless_bytes_grow_with_context(engines):
    s = engines["stateless"].run(PROMPT, 20, GREEDY).stats.to_dict()
    assert all(b > a for a, b in zip(s["bytes_out"][1:], s["bytes_out"][2:], strict=False))


def test_session_freed_after_close(engines, server):
    wait_for(lambda: server.sessions.active() == 0, what="no sessions before")
    stream = engines["session"].stream(PROMPT, 10, GREEDY)
    next(stream)
    assert server.sessions.active() == 1
    stream.close()  # a consumer that stops early (the UI's stop button)
    wait_for(lambda: server.sessions.active() == 0, what="session freed after stop")
    engines["session"].run(PROMPT, 3, GREEDY)
    wait_for(lambda: server.sessions.active() == 0, what="session freed after a full run")


def test_session_freed_when_client_process_dies(server, server_target):
    wait_for(lambda: server.sessions.active() == 0, what="no sessions before")
    code = f"""
import sys, time, torch
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcomm.proto import trunk_pb2 as pb
fp = TrunkClient(TrunkClientConfig({server_target!r})).info().fingerprint
s = TrunkClient(TrunkClientConfig({server_target!r})).session(fp)
s.step(torch.zeros(1, 4, 64))
print("stepped", flush=True)
time.sleep(60)
"""
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT
    )
    try:
        assert p.stdout.readline().strip() == "stepped"
        assert server.sessions.active() == 1
        os.kill(p.pid, signal.SIGKILL)
        wait_for(lambda: server.sessions.active() == 0, 10, "session freed after the client was killed")
    finally:
        p.kill()
        p.wait()


def test_monitor_stream_yields_samples(server_target, engines):
    with TrunkClient(TrunkClientConfig(server_target)) as client:
        samples = list(client.monitor(interval_s=0.2, max_samples=3))
    assert len(samples) == 3
    for s in samples:
        assert 0.0 <= s.cpu_percent <= 100.0
        assert 0 < s.mem_used_bytes <= s.mem_total_bytes and s.process_rss_bytes > 0
        assert not s.gpu_available and "no GPU" in s.gpu_status
        assert s.uptime_s > 0 and s.active_sessions >= 0
    assert samples[0].timestamp < samples[1].timestamp < samples[2].timestamp


def test_info_and_health(server_target, server):
    with TrunkClient(TrunkClientConfig(server_target)) as client:
        info = client.info()
    assert (info.split_start, info.split_end, info.n_embd, info.n_layer) == (2, 10, 64, 12)
    assert info.random_weights and info.model == "random:tiny" and info.device == "cpu"
    assert info.fingerprint.digest == server.fingerprint.digest and info.limits.max_sessions == 24
    channel = grpc.insecure_channel(server_target)
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_unreachable_server_fails_fast_with_address():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    t0 = time.monotonic()
    with pytest.raises(TrunkUnavailable, match=f"127.0.0.1:{port}.*check that it is running"):
        TrunkClient(TrunkClientConfig(f"127.0.0.1:{port}", connect_timeout_s=3)).info()
    assert time.monotonic() - t0 < 5


# --- malformed input ------------------------------------------------------------------------------------


def _raw_session(stub, msgs):
    """Send messages on one session stream; returns (responses, status code, details)."""
    responses = []
    try:
        for r in stub.Session(iter(msgs), timeout=10):
            responses.append(r)
    except grpc.RpcError as e:
        return responses, e.code(), e.details()
    return responses, grpc.StatusCode.OK, ""


def _tensor(shape, dtype=torch.float32, fill=0.0):
    return encode(torch.full(shape, fill, dtype=dtype))


def _step(i, tensor):
    return pb.StepRequest(step=pb.Step(step=i, hidden=tensor))


@pytest.fixture(scope="module")
def raw(server_target, server):
    channel = grpc.insecure_channel(server_target)
    fp = pb.Fingerprint(**server.fingerprint.to_dict(), digest=server.fingerprint.digest)
    yield pb_grpc.TrunkStub(channel), fp
    channel.close()


def _open(fp, max_length=0):
    return pb.StepRequest(open=pb.SessionOpen(fingerprint=fp, max_length=max_length))


BAD_STEPS = {
    "wrong hidden size": (_tensor([1, 2, 65]), grpc.StatusCode.INVALID_ARGUMENT, "hidden size is 65"),
    "wrong rank": (_tensor([2, 64]), grpc.StatusCode.INVALID_ARGUMENT, "2 dims"),
    "wrong dtype": (_tensor([1, 2, 64], torch.int64), grpc.StatusCode.INVALID_ARGUMENT, "floating point"),
    "unknown dtype": (
        pb.Tensor(data=b"\0" * 512, shape=[1, 2, 64], dtype=42),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown or unset",
    ),
    "NaN values": (_tensor([1, 2, 64], fill=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "empty tensor": (_tensor([1, 0, 64]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "data/shape mismatch": (
        pb.Tensor(data=b"\0" * 100, shape=[1, 2, 64], dtype=pb.FLOAT32),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 512",
    ),
    "past the context": (_tensor([1, 1025, 64]), grpc.StatusCode.RESOURCE_EXHAUSTED, "1025"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_gets_status_and_others_keep_working(raw, server, tiny, case):
    stub, fp = raw
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    good = TrunkClient(TrunkClientConfig(f"127.0.0.1:{server.port}")).session(fp)
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(1))
    cache = trunk.new_cache()
    out, *_ = good.step(x)
    assert torch.equal(out, trunk(x, cache))

    tensor, code, text = BAD_STEPS[case]
    responses, got_code, details = _raw_session(stub, [_open(fp), _step(0, tensor)])
    assert (got_code, responses) == (code, [])
    assert text in details

    y = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    out, *_ = good.step(y)  # the good session is untouched
    assert torch.equal(out, trunk(y, cache))
    good.close()
    wait_for(lambda: server.sessions.active() == 0, what="all sessions freed")


def test_session_protocol_errors(raw, server):
    stub, fp = raw
    x = _tensor([1, 1, 64])
    cases = [
        ([_step(0, x)], grpc.StatusCode.INVALID_ARGUMENT, "first message of a session must be 'open'"),
        ([_open(pb.Fingerprint())], grpc.StatusCode.INVALID_ARGUMENT, "no model fingerprint"),
        ([_open(fp), _step(1, x)], grpc.StatusCode.INVALID_ARGUMENT, "step 1 out of order"),
        ([_open(fp), _step(0, x), _open(fp)], grpc.StatusCode.INVALID_ARGUMENT, "expected a 'step'"),
        ([_open(fp, 5000)], grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 1024"),
        (
            [_open(fp, 4), _step(0, _tensor([1, 3, 64])), _step(1, _tensor([1, 2, 64]))],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "past its limit of 4",
        ),
        ([_open(fp), _step(0, x), _step(1, _tensor([2, 1, 64]))], grpc.StatusCode.INVALID_ARGUMENT, "batch size"),
    ]
    for msgs, code, text in cases:
        _, got, details = _raw_session(stub, msgs)
        assert got == code and text in details, (msgs, got, details)
    wait_for(lambda: server.sessions.active() == 0, what="all sessions freed")


def test_fingerprint_mismatch_names_the_difference(raw, server):
    stub, fp = raw
    other = pb.Fingerprint()
    other.CopyFrom(fp)
    other.split, other.digest = "3,10", "0000"
    _, code, details = _raw_session(stub, [_open(other), _step(0, _tensor([1, 1, 64]))])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "split points (2,10 vs 3,10)" in details


def test_client_with_other_split_refused_in_one_line(models_dir, server_target):
    engine = tiny_split_engine(models_dir, server_target, split="3,9")
    with pytest.raises(Mismatch, match="split 2,10, this client has random:tiny split 3,9"):
        engine.check_server()
    engine.close()


def test_stateless_bad_kv_rejected(raw):
    stub, fp = raw
    h = _tensor([1, 1, 64])
    for kv, text in [
        (_tensor([8, 2, 1, 4, 3, 15]), "KV cache has shape"),
        (_tensor([8, 2, 1, 4, 3, 16], fill=float("inf")), "NaN or infinite"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Forward(pb.ForwardRequest(fingerprint=fp, hidden=h, kv=kv), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.ForwardRequest(fingerprint=pb.Fingerprint(), hidden=h), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_process_ready_line_logs_and_sigterm(tmp_path):
    log = tmp_path / "server.log"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            "random:tiny",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("trunk server ready on 127.0.0.1:") and "RANDOM WEIGHTS" in line, p.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split(":")[0])
        with TrunkClient(TrunkClientConfig(f"127.0.0.1:{port}")) as c:
            assert c.info().split_start == 2
        sigterm_another_thread(p.pid)
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
    text = log.read_text()
    assert "serving random:tiny blocks 2-9" in text and "trunk server stopped" in text


def test_a_second_signal_stops_a_draining_server_at_once(tmp_path):
    """SIGTERM drains: an open session holds the server for --grace s. Another signal meanwhile ends it at once
    (exit 128 + 15, as a shell reports it)."""
    log, port = tmp_path / "server.log", free_port()
    p = start_server_process(port, "--grace", "60", log_file=str(log))
    try:
        with TrunkClient(TrunkClientConfig(f"127.0.0.1:{port}")) as c:
            s = c.session(c.info().fingerprint)
            s.step(torch.zeros(1, 3, 64))  # open, and left open: the drain waits for it
            p.send_signal(signal.SIGTERM)
            wait_for(lambda: "signal 15: shutting down" in log.read_text(), 20, "the drain")
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(timeout=1.0)  # still draining a second later: the open session holds it
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        p.kill()
    text = log.read_text()
    assert "signal 15 again: stopping at once" in text and "trunk server stopped" not in text


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--split", "9,3"], "error: split points 9,3"), (["--grace", "x"], "python -m server: error: argument --grace")],
)
def test_server_bad_flags_one_line(flags, says):
    r = subprocess.run(
        [sys.executable, "-m", "server", "--model", "random:tiny", *flags, "--port", "0"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(says), r.stderr


def test_step_times_nest(engines):
    """Each session step says where its time went: the server's wall time holds its compute, the client's holds both."""
    engine = engines["session"]
    stepper = engine.new_stepper(40)
    try:
        chunk = torch.tensor([engine.encode(PROMPT)])
        for _ in range(4):
            r = stepper.step(chunk)
            last = stepper.link.session.last
            assert 0 < last.server_ms <= last.server_wall_ms
            assert last.server_wall_ms + last.codec_ms <= last.wall_ms <= r.trunk_wall_ms
            assert stepper.last_bottom_ms > 0 and stepper.last_top_ms > 0 and stepper.last_head_ms > 0
            chunk = torch.tensor([[int(r.logits.argmax())]])
    finally:
        stepper.close()


def test_forward_reports_server_wall_time(server_target, engines):
    engine = engines["session"]
    with TrunkClient(TrunkClientConfig(server_target)) as client:
        stub = client.stub
        h = torch.randn(1, 3, engine.model.config.n_embd)
        resp = stub.Forward(pb.ForwardRequest(fingerprint=engine.fingerprint, hidden=encode(h)))
        assert 0 < resp.server_ms <= resp.server_wall_ms


def test_event_loop_choice(server):
    """The server's gRPC loop is uvloop by default where it is installed (it is a requirement); asyncio on request."""
    import asyncio

    import uvloop

    from splitcomm.channel import new_event_loop
    from splitcore.errors import InvalidInput

    assert isinstance(server.loop, uvloop.Loop)
    for kind, cls in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        assert isinstance(loop, cls) and (kind != "asyncio" or not isinstance(loop, uvloop.Loop))
        loop.close()
    with pytest.raises(InvalidInput, match="auto, uvloop or asyncio"):
        new_event_loop("trio")


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_a_steps_hidden_state_is_converted_once_on_each_side(models_dir, wire):
    """A trace (sys.setprofile) of every call into splitcomm/codec.py from outside it, in the client's thread and
    the server's event loop, over a prefill and decode steps: each side encodes once and decodes once a step; the
    server encodes a decode step's output as the numpy view of the batch's rows (no torch round trip)."""
    import numpy as np

    import splitcomm.codec as codec_module

    codec_file = codec_module.__file__
    conversions = {"encode", "decode", "decode_hidden", "encode_named", "decode_named"}  # message <-> tensor or array
    calls: dict[str, list[tuple[str, type]]] = {"client": [], "server": []}

    def tracer(side):
        def trace(frame, event, arg):
            if event == "call" and frame.f_code.co_filename == codec_file and frame.f_code.co_name in conversions:
                caller = frame.f_back
                if caller is not None and caller.f_code.co_filename != codec_file:
                    first = next(iter(frame.f_locals.values()), None)
                    calls[side].append((frame.f_code.co_name, type(first)))

        return trace

    from tests.conftest import start_tiny_server

    srv = start_tiny_server(models_dir)
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}", wire_dtype=wire)
    stepper = engine.new_stepper(16)
    try:
        stepper.step(torch.tensor([[464, 2068, 7586]]))  # warm: the session is open
        srv.loop.call_soon_threadsafe(sys.setprofile, tracer("server"))  # the servicer runs on that loop
        time.sleep(0.2)
        before = srv.sessions.counters.total_steps
        sys.setprofile(tracer("client"))
        try:
            stepper.step(torch.tensor([[11, 12]]))  # a prefill of two
            for t in (13, 14, 15):
                stepper.step(torch.tensor([[t]]))  # decode steps
        finally:
            sys.setprofile(None)
        wait_for(lambda: srv.sessions.counters.total_steps - before == 4, what="the steps booked")
        srv.loop.call_soon_threadsafe(sys.setprofile, None)
        time.sleep(0.2)
    finally:
        stepper.close()
        engine.close()
        srv.stop(0.5)
    assert [name for name, _ in calls["client"]] == ["encode", "decode"] * 4
    assert [name for name, _ in calls["server"]] == ["decode_hidden", "encode"] * 4
    decoded_outputs = [kind for name, kind in calls["server"] if name == "encode"][1:]
    assert decoded_outputs == [np.ndarray] * 3  # a float32 trunk's rows, whatever the wire's dtype
