"""Split learning over real gRPC: the same losses and adapter as local training, a PEFT adapter that HF loads,
nothing but hidden states and gradients on the wire, sessions freed, bad messages refused."""

from __future__ import annotations

import gc

import grpc
import pytest
import torch

from client.split_training import LocalTrainer, Run, SplitTrainer, TrainConfig, latest_checkpoint, load_checkpoint
from splitcomm.codec import encode
from splitcomm.errors import TrunkError
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.proto import trunk_pb2_grpc as pb_grpc
from splitcore.lora import add_lora, load_peft, twin
from splitcore.sampling import SamplingParams
from splitcore.training import TextData, held_bytes
from tests.conftest import CORPUS, ROOT, load_hf_model, start_tiny_server, tiny_split_engine, wait_for

SETTINGS = TrainConfig(lora_rank=4, lr=1e-2, seed=3, batch_size=2, block_size=32).lora()


@pytest.fixture(scope="module")
def trunk_server(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=6, grace_s=0.5)
    yield srv
    srv.stop(0.5)


@pytest.fixture(scope="module")
def engine(models_dir, trunk_server):
    e = tiny_split_engine(models_dir, f"127.0.0.1:{trunk_server.port}")
    yield e
    e.close()


@pytest.fixture(scope="module")
def data(engine):
    return TextData.from_path(CORPUS, engine.encode, block=32)


def _trunk_layers(engine) -> list[int]:
    return list(engine.split.layers("trunk", engine.model.config.n_layer))


@pytest.mark.parametrize("client_train", ["none", "lora", "full"])
def test_split_training_equals_local_training(engine, data, trunk_server, client_train):
    layers = list(range(12)) if client_train == "lora" else _trunk_layers(engine)
    local = LocalTrainer(engine.model, layers, SETTINGS, train_rest=client_train == "full")
    split = SplitTrainer(engine, SETTINGS, client_train)
    try:
        for step in range(1, 6):
            batch = data.batch(step, 2, seed=0)
            a, b = local.step(step, batch), split.step(step, batch)
            assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss), (step, a.loss, b.loss)
            assert b.bytes_out > 2 * 32 * 64 * 4 and b.server_ms > 0  # hidden states and a gradient went out
        want, got = local.adapter(), split.adapter()
        lora = [k for k in want if ".lora_" in k]
        assert set(want) == set(got) and len(lora) == 2 * 4 * len(layers)
        assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-5
        if client_train == "full":  # every client weight trained, the tied embedding/head once; the trunk's not
            client = set(want) - set(lora)
            assert "wte.weight" in client and "lm_head.weight" not in client and "h.0.attn.c_attn.weight" in client
            assert not any(k.startswith(("h.2.", "h.9.")) for k in client)
            base = engine.parts["bottom"].wte.weight
            assert float((got["wte.weight"] - base).abs().max()) > 0
        assert max(float(v.abs().max()) for k, v in got.items() if "lora_B" in k) > 0  # it did train
    finally:
        split.close()
    wait_for(lambda: trunk_server.sessions.active() == 0, what="training session freed")


def test_exported_adapter_loads_with_peft_on_hf(engine, data, tiny, tmp_path):
    from peft import PeftModel

    cfg = TrainConfig(steps=3, eval_every=0, eval_batches=1, batch_size=2, block_size=32, lora_rank=4, lr=1e-2)
    cfg.out = str(tmp_path / "adapter")
    split = SplitTrainer(engine, cfg.lora())
    try:
        events = list(Run(split, data, cfg, tiny.spec))
    finally:
        split.close()
    assert [e.kind for e in events][-3:] == ["eval", "checkpoint", "done"]
    hf = PeftModel.from_pretrained(load_hf_model(tiny.path), cfg.out).eval()
    weights, _ = load_peft(tmp_path / "adapter")
    ours = LocalTrainer(engine.model, _trunk_layers(engine), cfg.lora(), resume=(weights, {}, 0))
    ids = data.batch(99, 2, seed=1)
    with torch.no_grad():
        diff = (hf(ids).logits - ours.model(ids, all_positions=True)).abs().max()
        acts = (hf(ids).logits - load_hf_model(tiny.path)(ids).logits).abs().max()
    assert float(diff) < 1e-4
    assert float(acts) > 1e-4  # the adapter acts


def test_training_messages_carry_no_token_ids_or_labels():
    """Every message of the training path: floating-point tensors and settings, never ids or labels."""
    seen, todo = set(), [pb.TrainRequest.DESCRIPTOR, pb.TrainResponse.DESCRIPTOR]
    while todo:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        for f in d.fields:
            assert not any(w in f.name.lower() for w in ("token", "label", "ids", "text", "prompt")), f.full_name
            if f.message_type is not None:
                todo.append(f.message_type)
    assert "gpt2split.v1.Tensor" in seen and "gpt2split.v1.TrainForward" in seen


def test_split_training_sends_floats_only(engine, data, monkeypatch):
    """And at run time: what the client encodes for the trunk is hidden states and gradients, in float."""
    from splitcomm import trunk_client

    sent = []
    real = trunk_client.encode
    monkeypatch.setattr(trunk_client, "encode", lambda t, dtype=None: sent.append(t.dtype) or real(t, dtype))
    split = SplitTrainer(engine, SETTINGS)
    try:
        split.step(1, data.batch(1, 2, seed=0))
    finally:
        split.close()
    assert sent and all(d.is_floating_point for d in sent)


def _raw_train(target: str, messages: list[pb.TrainRequest]):
    with grpc.insecure_channel(target) as ch:
        call = pb_grpc.TrunkStub(ch).Train(iter(messages))
        got = []
        try:
            for r in call:
                got.append(r)
        except grpc.RpcError as e:
            return got, e.code(), e.details()
        return got, grpc.StatusCode.OK, ""


def _open(engine, **lora) -> pb.TrainRequest:
    return pb.TrainRequest(open=pb.TrainOpen(fingerprint=engine.fingerprint, lora=pb.LoraSpec(**lora)))


def _fwd(step, t):
    return pb.TrainRequest(forward=pb.TrainForward(step=step, hidden=encode(t)))


def _bwd(step, t):
    return pb.TrainRequest(backward=pb.TrainBackward(step=step, grad=encode(t)))


BAD = {
    "absurd rank": ([dict(rank=100000)], "rank must be in 1..64"),
    "unknown target": ([dict(rank=4, target_modules=["attn.q_proj"])], "targets must be some of"),
    "wrong hidden size": ([dict(rank=4), _fwd(0, torch.zeros(1, 4, 65))], "hidden size is 65"),
    "backward before forward": ([dict(rank=4), _bwd(0, torch.zeros(1, 4, 64))], "before its forward"),
    "gradient of the wrong shape": (
        [dict(rank=4), _fwd(0, torch.zeros(1, 4, 64)), _bwd(0, torch.zeros(1, 3, 64))],
        "gradient has shape [1, 3, 64]",
    ),
    "NaN gradient": (
        [dict(rank=4), _fwd(0, torch.zeros(1, 4, 64)), _bwd(0, torch.full((1, 4, 64), float("nan")))],
        "NaN",
    ),
    "NaN hidden states": ([dict(rank=4), _fwd(0, torch.full((1, 4, 64), float("inf")))], "NaN or infinite"),
    "backward of another step": (
        [dict(rank=4), _fwd(0, torch.zeros(1, 4, 64)), _bwd(7, torch.zeros(1, 4, 64))],
        "latest forward was step 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_training_messages_are_refused_and_inference_goes_on(engine, trunk_server, case):
    first, *rest = BAD[case][0]
    got, code, details = _raw_train(f"127.0.0.1:{trunk_server.port}", [_open(engine, **first), *rest])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert BAD[case][1] in details
    assert len(engine.run("Hello", 5, SamplingParams(0.0)).token_ids) == 5  # inference goes on
    wait_for(lambda: trunk_server.sessions.active() == 0, what="refused training session freed")


def test_training_session_memory_freed_on_close_and_cancel(engine, data, trunk_server):
    handler = trunk_server.servicer.training
    gc.collect()  # sessions of earlier tests that ended in an error: their tracebacks hold cycles
    for end in ("close", "cancel"):
        split = SplitTrainer(engine, SETTINGS)
        split.remote.forward(1, torch.zeros(2, 32, 64))  # activations kept for a backward that never comes
        assert len(handler.live) == 1
        if end == "close":
            split.close()
        else:
            split.remote._stream._call.cancel()
        wait_for(lambda: trunk_server.sessions.active() == 0, what=f"session gone after {end}")
        wait_for(lambda: gc.collect() is not None and len(handler.live) == 0, what=f"trainer freed after {end}")


def test_wrong_fingerprint_is_refused(engine, trunk_server):
    fp = pb.Fingerprint()
    fp.CopyFrom(engine.fingerprint)
    fp.digest, fp.split = "0" * 16, "3,10"
    msg = pb.TrainRequest(open=pb.TrainOpen(fingerprint=fp, lora=pb.LoraSpec(rank=4)))
    _, code, details = _raw_train(f"127.0.0.1:{trunk_server.port}", [msg])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "split points" in details


@pytest.mark.parametrize("client_train", ["none", "full"])
def test_resume_from_checkpoint_goes_on_as_if_never_stopped(engine, data, tmp_path, client_train):
    base = TrainConfig(steps=4, eval_every=2, eval_batches=1, batch_size=2, block_size=32, lora_rank=4, lr=1e-2)
    base.out, base.client_train = str(tmp_path / "straight"), client_train
    split = SplitTrainer(engine, base.lora(), client_train)
    straight = [e.stats.loss for e in Run(split, data, base, "random:tiny") if e.kind == "step"]
    split.close()

    cfg = TrainConfig(**{**base.__dict__, "out": str(tmp_path / "stopped")})
    split = SplitTrainer(engine, cfg.lora(), client_train)
    run = Run(split, data, cfg, "random:tiny")
    first = []
    for e in run:
        if e.kind == "step":
            first.append(e.stats.loss)
            if e.step == 2:
                run.stop()  # as Ctrl-C does: the run ends after this step, with a checkpoint
    split.close()
    assert len(first) == 2
    weights, moments, opt_steps, step, log = load_checkpoint(latest_checkpoint(tmp_path / "stopped"))
    assert step == 2 and opt_steps == 2 and moments
    split = SplitTrainer(engine, cfg.lora(), client_train, resume=(weights, moments, opt_steps))
    rest = [e.stats.loss for e in Run(split, data, cfg, "random:tiny", start=step, log=log) if e.kind == "step"]
    split.close()
    assert first + rest == pytest.approx(straight, rel=1e-6)


def test_split_points_differ_is_a_clear_error(models_dir, trunk_server):
    other = tiny_split_engine(models_dir, f"127.0.0.1:{trunk_server.port}", split="3,10")
    with pytest.raises(TrunkError, match="split points") as e:
        SplitTrainer(other, SETTINGS)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    other.close()


def test_train_cli_ctrl_c_saves_and_resume_finishes(tiny, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import TINY, free_port, start_server_process, subprocess_env

    port = free_port()
    server = start_server_process(port, log_file=str(tmp_path / "server.log"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "client", "train", "--model", TINY, "--server", f"127.0.0.1:{port}"]
    cmd += ["--data", str(CORPUS), "--batch-size", "2", "--block-size", "32", "--out", str(out)]
    try:
        p = subprocess.Popen(
            [*cmd, "--steps", "100000", "--eval-every", "0"],
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        seen, deadline = "", time.monotonic() + 120
        while "tok/s" not in seen and time.monotonic() < deadline:  # a step's progress line: training is on
            chunk = p.stderr.read(1)
            if not chunk:
                break
            seen += chunk
        assert "tok/s" in seen, seen[-2000:]
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        err = seen + err
        assert p.returncode == 130, err[-2000:]
        stopped = int(err.split("stopped at step ")[1].split(":")[0])
        assert stopped >= 1 and (out / f"checkpoint-{stopped}" / "adapter_model.safetensors").exists()

        r = subprocess.run(
            [*cmd, "--steps", str(stopped + 2), "--resume"],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"resuming from {out / f'checkpoint-{stopped}'}" in r.stderr and "adapter saved" in r.stderr
        log = json.loads((out / "training_log.json").read_text())
        assert [s for s, _ in log["losses"]] == list(range(1, stopped + 3))
        assert (out / "adapter_config.json").exists()

        bad = subprocess.run(
            [*cmd[:-2], "--steps", "0"], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT
        )
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: need --steps >= 1")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_trained_preset_recipe_lowers_perplexity_and_loads(tmp_path):
    """The recipe behind trained:kjv, shortened: real text in, a checkpoint that loads like any model out."""
    import os
    import shutil

    from splitcore import presets
    from splitcore.models import resolve_model
    from splitcore.parts import load_full

    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's bible-kjv is not installed (scripts/test.sh installs it)")
        pytest.skip("Debian's bible-kjv is not installed")
    recipe = presets.Recipe(n_embd=64, n_head=4, steps=30, batch_size=4, block_size=64, warmup=5, lr=3e-3)
    report = presets.build("kjv", tmp_path / "trained-kjv", recipe)
    assert report["held_out_perplexity_after"] < 0.5 * report["held_out_perplexity_before"]
    assert report["train_tokens"] > 500_000 and "public domain" in report["text"]
    model = resolve_model(str(tmp_path / "trained-kjv"), tmp_path)  # saved in HF's layout: both read it alike
    ids = torch.tensor([[818, 262, 3726, 1793, 2727, 262, 9538]])  # "In the beginning God created the heaven"
    with torch.no_grad():
        assert (
            float((load_hf_model(model.path)(ids).logits - load_full(model)(ids, all_positions=True)).abs().max())
            < 1e-4
        )


def test_unknown_trained_preset_is_a_clear_error(tmp_path):
    from splitcore.errors import ModelSpecError
    from splitcore.models import resolve_model

    with pytest.raises(ModelSpecError, match="unknown trained preset 'trained:nope'; choose one of trained:kjv"):
        resolve_model("trained:nope", tmp_path)


def test_held_bytes_counts_activations_not_weights(engine):
    """What bench_train's memory table reports: activations scale with the batch, weights are not counted, and
    recomputing holds the input alone."""
    part = add_lora(twin(engine.parts["bottom"]), SETTINGS)
    ids = torch.randint(0, 1000, (2, 32))
    keep2, keep4 = held_bytes(part, ids), held_bytes(part, torch.cat([ids, ids]))
    assert keep4 == 2 * keep2  # every saved tensor has the batch dimension: no weight among them
    weights = sum(p.numel() * 4 for p in part.parameters())
    assert 0 < keep2 < weights  # the tiny model's weights would dwarf this batch's activations
    h = torch.randn(2, 32, 64)
    assert held_bytes(part, h, recompute=True) == h.nbytes
