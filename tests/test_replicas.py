"""Replicas: plain trunk servers, in processes of their own, behind the client's round robin (a list of addresses)
or behind nginx with the config from deploy/. Sessions spread, get the full model's tokens, move to another
replica when theirs dies or drains, and a replica with another model is refused by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from scripts.nginx_proxy import Nginx, find_nginx
from splitcomm.errors import TrunkError
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.sampling import SamplingParams
from tests.conftest import ROOT, TINY, free_port, subprocess_env, tiny_split_engine, wait_for

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [f"{w} of the river, number {i}" for i, w in enumerate(["Out", "In", "Across", "Down"] * 3)]
NEW_TOKENS = 40


class Replica:
    """A trunk server process on 127.0.0.1, its log in a real file."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp / f"replica-{self.port}.log"
        cmd = [sys.executable, "-m", "server", "--model", TINY, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--device", "cpu", "--log-file", str(self.log), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT
        )

    def ready(self) -> Replica:
        line = self.proc.stdout.readline()
        if "ready on" not in line:
            self.proc.kill()
            raise RuntimeError(f"replica did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        return self

    def sessions(self) -> int:
        """Sessions this replica has opened since it started (its monitor stream's count)."""
        with TrunkClient(TrunkClientConfig(self.address)) as c:
            return next(iter(c.monitor(max_samples=1))).total_sessions

    def active(self) -> int:
        with TrunkClient(TrunkClientConfig(self.address)) as c:
            return c.info().active_sessions

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def start_replicas(tmp: Path, n: int, *args: str) -> list[Replica]:
    replicas = [Replica(tmp, *args) for _ in range(n)]  # they start side by side
    return [r.ready() for r in replicas]


@pytest.fixture(params=["client round robin", "nginx"])
def through(request, tmp_path):
    """How clients reach the replicas: a list of their addresses, or nginx's one address."""
    if request.param == "nginx" and find_nginx() is None:
        if os.environ.get("GPT2_REQUIRE_BROWSER") == "1":  # CI: every tool the tests install must be there
            pytest.fail("nginx is not installed (scripts/test.sh installs it with apt)")
        pytest.skip("nginx is not installed (apt install nginx)")
    started = []

    def target(replicas: list[Replica]) -> str:
        if request.param == "nginx":
            started.append(Nginx([r.address for r in replicas], prefix=tmp_path / "nginx"))
            return started[-1].address
        return ",".join(r.address for r in replicas)

    yield target
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def want(full_model, tokenizer) -> dict[str, list[int]]:
    """HF's greedy tokens for every prompt: the reference each client must get."""
    out = {}
    for p in PROMPTS:
        ids = tokenizer.encode(p)
        gen = full_model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256, eos_token_id=None
        )
        out[p] = gen[0, len(ids) :].tolist()
    return out


def generate_all(models_dir, target: str, during=None, **settings) -> tuple[dict, list[str], list[BaseException]]:
    """Twelve clients at once, each its own prompt, through one client process (as the app and the API serve their
    users: one channel, whose round robin spreads their sessions): their tokens, what they were told, their
    errors. `during()` runs once every client is generating."""
    got, notices, errors = {}, [], []
    engine = tiny_split_engine(models_dir, target, notify=notices.append, **settings)
    engine.run("warm up", 1, GREEDY)  # the channel connects to every replica it can
    started = threading.Barrier(len(PROMPTS) + 1)

    def client(prompt: str) -> None:
        try:
            started.wait()
            got[prompt] = engine.run(prompt, NEW_TOKENS, GREEDY).token_ids
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    started.wait()
    if during is not None:
        during()
    for t in threads:
        t.join(timeout=120)
    engine.close()
    return got, notices, errors


@pytest.mark.slow
def test_twelve_clients_over_three_replicas_get_hf_tokens_and_every_replica_serves(models_dir, tmp_path, want, through):
    replicas = start_replicas(tmp_path, 3)
    try:
        got, _, errors = generate_all(models_dir, through(replicas))
        assert not errors, errors
        assert got == want
        assert all(r.sessions() >= 1 for r in replicas), [r.sessions() for r in replicas]
    finally:
        for r in replicas:
            r.stop()


def _slow(**kw) -> dict:
    """Client settings that keep twelve generations going for a few seconds (a trunk far away)."""
    return {"added_delay_ms": 15.0, "reconnect_s": 30.0, "connect_timeout_s": 3.0} | kw


@pytest.mark.slow
def test_a_replica_killed_mid_generation_costs_its_sessions_a_replay_with_identical_tokens(
    models_dir, tmp_path, want, through
):
    replicas = start_replicas(tmp_path, 3)
    victim = replicas[1]

    def kill() -> None:
        wait_for(lambda: victim.active() >= 1, 30, "sessions on the victim")
        victim.proc.send_signal(signal.SIGKILL)

    try:
        got, notices, errors = generate_all(models_dir, through(replicas), kill, **_slow())
        assert not errors, errors
        assert got == want  # the same tokens, replayed on the others
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        assert any("lost" in m and "replaying the session" in m for m in notices), notices
        assert any("replayed" in m for m in notices), notices
    finally:
        for r in replicas:
            r.stop()


@pytest.mark.slow
def test_a_drained_replica_takes_no_new_session_and_no_client_sees_an_error(models_dir, tmp_path, want, through):
    replicas = start_replicas(tmp_path, 3, "--grace", "1")
    drained = replicas[0]

    def drain() -> None:
        wait_for(lambda: drained.active() >= 1, 30, "sessions on the drained replica")
        drained.proc.send_signal(signal.SIGTERM)

    try:
        target = through(replicas)
        got, notices, errors = generate_all(models_dir, target, drain, **_slow())
        assert not errors, errors
        assert got == want
        assert drained.proc.wait(timeout=30) == 0
        log = drained.log.read_text()
        after = log.split("signal 15: shutting down", 1)[1]
        assert "draining: health NOT_SERVING" in after
        assert " opened by " not in after  # no session opened after the signal
        # and the others go on serving new clients
        more, _, errors = generate_all(models_dir, target, **_slow(added_delay_ms=0.0))
        assert not errors and more == want
    finally:
        for r in replicas:
            r.stop()


@pytest.mark.slow
def test_a_replica_with_another_split_is_refused_per_session_naming_it(models_dir, tmp_path):
    good, other = start_replicas(tmp_path, 1)[0], start_replicas(tmp_path, 1, "--split", "3,10")[0]
    try:
        engine = tiny_split_engine(models_dir, f"{good.address},{other.address}")
        outcomes = []
        for _ in range(4):  # round robin: two sessions land on each
            try:
                outcomes.append(len(engine.run("Hello there", 4, GREEDY).token_ids))
            except TrunkError as e:
                outcomes.append(str(e))
        engine.close()
        refusals = [o for o in outcomes if isinstance(o, str)]
        assert outcomes.count(4) >= 1 and refusals, outcomes
        assert all(f"replica {other.address}" in o and "split" in o for o in refusals), refusals
    finally:
        good.stop()
        other.stop()


def test_a_full_replica_sends_the_session_to_one_with_room(models_dir, tiny):
    """Round robin does not know which replica is full: one at its session limit refuses, and the client's next try
    goes to the next replica. Every generation succeeds while one replica is full."""
    from tests.conftest import start_tiny_replicas

    replicas = start_tiny_replicas(models_dir, 2, max_sessions=1, grace_s=0.5)
    full = TrunkClient(TrunkClientConfig(f"127.0.0.1:{replicas.servers[0].port}"))
    held = full.session(full.info().fingerprint)
    held.step(torch.zeros(1, 2, 64))  # replica 0 is full from now on
    engine = tiny_split_engine(models_dir, replicas.target)
    replicas.wait_all_ready(engine.trunk_client)  # round robin reaches both: a refused try's retry goes to the other
    try:
        for _ in range(4):  # round robin sends about half of the first tries to the full one
            # the last generation's session closes as its stream ends, after run() returns: wait for it, or the
            # replica with room may still be full of it (seen under load)
            wait_for(lambda: replicas.servers[1].sessions.active() == 0, 10, "the last session closed")
            assert len(engine.run("Room for one more", 4, GREEDY).token_ids) == 4
        assert replicas.servers[1].sessions.counters.total_sessions == 4
        assert replicas.servers[0].sessions.counters.total_sessions == 1  # the held one alone
    finally:
        engine.close()
        held.close()
        full.close()
        replicas.stop(0.5)
