"""Federated split learning on Flower's deployment runtime: real `python -m client federate serve|join` processes
(a SuperLink, SuperNodes and the ClientApp and ServerApp processes they start) against a real trunk server over
gRPC. The result is checked against FedAvg written out plainly here, over local runs of the whole model in this
process; the trunk's every training message is recorded to show that no owner's weight reaches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from client.config import FederationConfig
from client.federated import SECAGG_CLIP, SECAGG_LEVELS, load_weights
from client.split_training import LocalTrainer
from splitcore.lora import is_lora
from splitcore.models import load_tokenizer
from splitcore.training import TextData
from tests.conftest import (
    CORPUS,
    ROOT,
    TINY,
    free_port,
    load_hf_model,
    make_pki,
    start_tiny_server,
    subprocess_env,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # Flower rounds: tens of seconds each

FED = FederationConfig(
    model=TINY, rounds=2, local_steps=3, batch_size=2, block_size=32, lora_rank=4, lr=1e-2, eval_batches=1, seed=3
)
SHARES = {"gospels": 0.5, "epistles": 0.3, "revelation": 0.2}  # three owners' disjoint parts of one text


@pytest.fixture(scope="module")
def trunk(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=8, grace_s=0.5)
    yield srv
    srv.stop(0.5)


@pytest.fixture(scope="module")
def owners(tmp_path_factory) -> dict[str, Path]:
    text, at, out = CORPUS.read_text(), 0, {}
    root = tmp_path_factory.mktemp("owners")
    for name, share in SHARES.items():
        n = int(len(text) * share)
        (root / name).mkdir()
        (root / name / f"{name}.txt").write_text(text[at : at + n])
        at += n
        out[name] = root / name
    return out


@pytest.fixture
def recorded(trunk):
    """Every training message the trunk receives: the names of the weights a session is opened with, and the
    shape of each tensor of a forward or backward."""
    h, seen = trunk.servicer.training, {"opened": [], "tensors": []}
    open_, forward, backward = h._open, h._forward, h._backward

    def rec_open(first, peer, cancel):
        seen["opened"].append([w.name for w in first.open.resume.weights])
        return open_(first, peer, cancel)

    def rec_forward(trainer, msg):
        seen["tensors"].append(("forward", tuple(msg.hidden.shape)))
        return forward(trainer, msg)

    def rec_backward(trainer, msg):
        seen["tensors"].append(("backward", tuple(msg.grad.shape)))
        return backward(trainer, msg)

    h._open, h._forward, h._backward = rec_open, rec_forward, rec_backward
    yield seen
    del h._open, h._forward, h._backward


class Proc:
    """A `python -m client ...` process in a session of its own, its output in a file; `kill` takes it and every
    process it started (Flower detaches some), as a machine that dies would."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.p = subprocess.Popen(
            [sys.executable, "-m", "client", *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=ROOT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        try:
            procs = [psutil.Process(self.p.pid), *psutil.Process(self.p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.p.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output()[-3000:]}") from None


def serve(fed: FederationConfig, port: int, log: Path, *extra: str) -> Proc:
    flags = list(extra)
    for k, v in vars(fed).items():
        flag = f"--{k.replace('_', '-')}"
        flags += ([flag] if v else []) if isinstance(v, bool) else [flag, str(v)]  # booleans are switches
    return Proc(["federate", "serve", *flags, "--port", str(port)], log)


def join(name: str, data: Path, port: int, trunk, tmp: Path, *extra: str) -> Proc:
    args = ["federate", "join", "--data", str(data), "--name", name, "--federation", f"127.0.0.1:{port}"]
    args += ["--server", f"127.0.0.1:{trunk.port}", "--device", "cpu", "--workdir", str(tmp / name), *extra]
    return Proc(args, tmp / f"{name}.log")


class Recorder:
    """A TCP relay in front of the fed server's SuperLink that keeps every byte the owners' SuperNodes send it:
    what the fed server receives from them, whatever Flower does with it after."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream, self.sent, self.lock = upstream_port, bytearray(), threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # the SuperLink is not up yet: the SuperNode retries
                down.close()
                continue
            threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src, dst, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, shape) of every NumPy array in what the owners sent (Flower's arrays travel as np.save bytes;
        one whose header an HTTP/2 frame boundary cuts is missed)."""
        import re

        with self.lock:
            data = bytes(self.sent)
        header = rb"\x93NUMPY..(?:..)?\{'descr': '([<>|]\w+)', 'fortran_order': \w+, 'shape': \(([\d, ]*)\)"
        found = re.findall(header, data, re.S)
        return [(d.decode(), tuple(int(x) for x in shape.split(b",") if x.strip())) for d, shape in found]

    def close(self) -> None:
        self.sock.close()


def fedavg_reference(
    fed: FederationConfig, datas: list[TextData], average: dict | None = None, done: int = 0
) -> dict[str, torch.Tensor]:
    """FedAvg as written in the paper, over the same local runs: each owner trains the whole model here from the
    average (a fresh optimizer each round), and the average is weighted by the owners' training windows. From
    `average` after round `done`, or from the start."""
    from splitcore.models import resolve_model

    model = resolve_model(fed.model, os.environ["GPT2_MODELS_DIR"])
    layers = list(range(model.config.n_layer))  # --client-train lora: an adapter on every block
    for r in range(done + 1, fed.rounds + 1):
        results = []
        for data in datas:
            local = LocalTrainer(model, layers, fed.lora(), (average, {}, 0) if average else None)
            first = (r - 1) * fed.local_steps + 1
            for step in range(first, first + fed.local_steps):
                local.step(step, data.batch(step, fed.batch_size, fed.seed))
            results.append((local.adapter(), len(data.train) // fed.block_size))
        total = sum(n for _, n in results)
        average = {k: sum(w[k] * (n / total) for w, n in results) for k in results[0][0]}
    return average


def test_federated_rounds_equal_plain_fedavg_across_a_fed_server_restart(trunk, owners, recorded, tiny, tmp_path):
    """Two owners, two rounds, the fed server killed (with every process it started) after round 1 and started
    again: it resumes from round 1's checkpoint, and the averaged adapter is FedAvg's to 1e-5. The trunk got
    activations, gradients and its own adapter back, never an owner's weight, and freed every session."""
    port, out = free_port(), tmp_path / "fed"
    fed = FederationConfig(**(vars(FED) | {"out": str(out), "min_owners": 2}))
    names = ["gospels", "epistles"]
    server = serve(fed, port, tmp_path / "serve-1.log")
    relay = Recorder(port)
    members = [join(n, owners[n], relay.port, trunk, tmp_path) for n in names]
    try:
        wait_for(lambda: (out / "round-1" / "adapter_model.safetensors").is_file(), 300, "round 1's checkpoint")
        server.kill()
        assert not (out / "adapter_config.json").exists()  # the run was cut short
        again = serve(fed, port, tmp_path / "serve-2.log")
        assert again.wait(400) == 0, again.output()[-3000:]
    finally:
        for m in members:
            m.kill()
        relay.close()
    assert "resuming after round 1" in again.output() and "round 2/2: 2 owners" in again.output()
    # without --secagg the fed server gets each owner's weights as they are (what the SecAgg+ test rules out)
    assert len([a for a in relay.arrays() if a[0] == "<f4" and len(a[1]) == 2]) >= 2 * 4 * 12

    tok = load_tokenizer(tiny.path)
    datas = [TextData.from_path(owners[n], tok.encode, fed.block_size) for n in names]
    want, got = fedavg_reference(fed, datas), load_weights(out)
    assert set(got) == set(want) and len(want) == 2 * 4 * 12  # LoRA A and B on 4 kinds of module, 12 blocks
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-5
    assert max(float(v.abs().max()) for k, v in got.items() if "lora_B" in k) > 0  # it did train

    # the same artifact as `python -m client train`: HF + PEFT load it and run the averaged model
    from peft import PeftModel

    hf = PeftModel.from_pretrained(load_hf_model(tiny.path), str(out)).eval()
    ids = datas[0].batch(99, 2, seed=1)
    with torch.no_grad():
        ours = LocalTrainer(tiny, list(range(12)), fed.lora(), (want, {}, 0)).model(ids, all_positions=True)
        assert float((hf(ids).logits - ours).abs().max()) < 1e-4

    log = json.loads((out / "federation_log.json").read_text())["rounds"]
    assert [sorted(o["name"] for o in r["owners"]) for r in log] == [sorted(names)] * 2
    assert log[-1]["averaged_held_out_loss"] > 0  # round 1's evaluation was cut short with its server
    assert "averaged model" in (out / "federation.html").read_text()  # the fed server's page

    # separation: the trunk was opened with nothing but its own blocks' adapter, and sent only activations
    trunk_blocks = {f"h.{i}." for i in range(2, 10)}
    opened = recorded["opened"]
    # each owner: round 1's training (fresh), round 2's training and evaluation (round 1's was cut short)
    assert len(opened) == 6 and opened.count([]) == 2
    assert all(is_lora(n) and n.startswith(tuple(trunk_blocks)) for names_ in opened for n in names_)
    assert max(len(n) for n in opened) == 2 * 4 * 8  # the trunk's adapter: 8 blocks, 4 kinds, A and B
    assert recorded["tensors"] and all(s[-1] == 64 and len(s) == 3 for _, s in recorded["tensors"])
    wait_for(lambda: trunk.sessions.active() == 0, 10, "every training session freed")


def test_secagg_the_fed_server_gets_only_a_masked_sum(trunk, owners, tiny, tmp_path):
    """--secagg: Flower's SecAgg+ between two owners, two rounds. Every byte the owners send the fed server is
    recorded on its way: no float array at all, only masked integers, and round 1's average is FedAvg's to within
    SecAgg+'s quantisation (a step of 16 / 2^22 per owner, scaled by max weight / windows), not exactly (it did go
    through the quantised sum). The second round runs from the unmasked average, named as the owners named it."""
    names = ["gospels", "epistles"]
    tok = load_tokenizer(tiny.path)
    datas = [TextData.from_path(owners[n], tok.encode, FED.block_size) for n in names]
    windows = [len(d.train) // FED.block_size for d in datas]
    port, out = free_port(), tmp_path / "fed"
    settings = {"out": str(out), "min_owners": 2, "secagg": True, "secagg_max_weight": max(windows)}
    fed = FederationConfig(**(vars(FED) | settings))
    server = serve(fed, port, tmp_path / "serve.log")
    relay = Recorder(port)
    members = [join(n, owners[n], relay.port, trunk, tmp_path) for n in names]
    try:
        assert server.wait(600) == 0, server.output()[-3000:]
    finally:
        for m in members:
            m.kill()
        relay.close()
    assert "round 2/2: 2 owners" in server.output()

    sent = relay.arrays()
    assert not [a for a in sent if a[0][1] == "f"], sent[:5]  # no float array left an owner for the fed server
    tensors = 2 * 4 * 12  # LoRA A and B on 4 kinds of module, 12 blocks
    masked = [a for a in sent if a[0][1] in "iu"]
    assert len(masked) >= len(names) * fed.rounds * (tensors + 1) // 2  # a masked vector each (and the weight)

    # each round's average: FedAvg's from the round before's, to within the quantisation (stochastic rounding
    # errs by under one step per owner, in weight * value) and the split's 1e-6
    step = 2 * SECAGG_CLIP / SECAGG_LEVELS
    bound = len(names) * step * fed.secagg_max_weight / sum(windows) + 1e-6
    before = None
    for r in (1, 2):
        got = load_weights(out / f"round-{r}")
        want = fedavg_reference(replace(fed, rounds=r), datas, before, r - 1)
        assert set(got) == set(want) and len(want) == tensors
        err = max(float((want[k] - got[k]).abs().max()) for k in want)
        assert 1e-6 < err <= bound, (r, err, bound)  # not exact: it went through the quantised sum
        before = got
    final = load_weights(out)
    assert max(float((final[k] - got[k]).abs().max()) for k in got) == 0  # the saved adapter is round 2's
    log = json.loads((out / "federation_log.json").read_text())["rounds"]
    assert [sorted(o["name"] for o in r["owners"]) for r in log] == [sorted(names)] * 2
    assert all(r["averaged_held_out_loss"] > 0 for r in log)


def test_an_owner_killed_mid_round_leaves_the_round_to_the_others(trunk, owners, recorded, tmp_path):
    """Three owners, at least two needed: one dies while it trains (its trunk calls slowed so that it is mid-round
    for sure). The round completes with the other two, and the trunk frees the dead owner's session. The Flower
    link runs TLS here (the fed server's certificate, the owners' --federation-ca)."""
    port, out, pki = free_port(), tmp_path / "fed", make_pki(tmp_path)
    fed = FederationConfig(**(vars(FED) | {"out": str(out), "min_owners": 2, "rounds": 1, "round_timeout_s": 240}))
    tls = ["--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-ca", pki["ca"]]
    server = serve(fed, port, tmp_path / "serve.log", *tls)
    ca = ("--federation-ca", pki["ca"])
    members = {n: join(n, owners[n], port, trunk, tmp_path, *ca) for n in ("gospels", "epistles")}
    slow = ("--added-delay-ms", "400")
    members["revelation"] = join("revelation", owners["revelation"], port, trunk, tmp_path, *ca, *slow)
    try:
        wait_for(lambda: len(recorded["opened"]) >= 3, 240, "three owners training")
        members["revelation"].kill()
        assert server.wait(400) == 0, server.output()[-3000:]
    finally:
        for m in members.values():
            m.kill()
    log = json.loads((out / "federation_log.json").read_text())["rounds"]
    assert sorted(o["name"] for o in log[0]["owners"]) == ["epistles", "gospels"]
    assert (out / "adapter_config.json").is_file()
    wait_for(lambda: trunk.sessions.active() == 0, 30, "the dead owner's training session freed")
    assert "(TLS)" in server.output()


def test_federate_refuses_bad_settings_in_one_line(tmp_path):
    fed = tmp_path / "fed"
    cases = [
        (["serve", "--rounds", "0"], "--rounds"),
        (["serve", "--host", "0.0.0.0"], "without TLS"),
        (["serve", "--client-train", "some"], "--client-train"),
        (["join", "--data", str(tmp_path / "none")], "does not exist"),
        (["join", "--data", str(CORPUS), "--federation", "nowhere"], "host:port"),
        (["join"], "--data is required"),
        (["serve", "--tls-cert", str(CORPUS)], "all three"),
        (["serve", "--secagg", "--min-owners", "1"], "--min-owners"),
        (["join", "--data", str(CORPUS), "--federation-ca", str(tmp_path / "none")], "no such file"),
    ]
    for args, words in cases:
        where = "--out" if args[0] == "serve" else "--workdir"
        r = subprocess.run(
            [sys.executable, "-m", "client", "federate", *args, where, str(fed)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
            timeout=60,
        )
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # the same --out with other settings is refused, not mixed into
    fed.mkdir()
    (fed / "federation.json").write_text(FED.to_json())
    r = subprocess.run(
        [sys.executable, "-m", "client", "federate", "serve", "--out", str(fed), "--rounds", "9"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "other settings" in r.stderr, r.stderr
