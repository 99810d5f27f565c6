"""Every run script that the README or the docs name, run as a user runs it: `bash scripts/run_*.sh` in its own
process group with a user's environment (the scripts set up their own), on free ports given through the documented
environment variables, with the small model through GPT2_MODEL. Each waits until its documented ports answer (gRPC
health, HTTP 200 from each app and from /v1/models), generates once through the app's HTTP API or the OpenAI API
(greedy, checked against Hugging Face's generate), then sends Ctrl-C and checks that nothing it started still runs
and every port is free."""

from __future__ import annotations

import psutil
import pytest
import torch

from tests.conftest import ROOT, TINY, wait_for
from tests.scripts_support import Script, app_generate, free_ports, grpc_serving, http_ok, port_free, user_env

pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The history of the Roman Empire"


@pytest.fixture(scope="module")
def hf_greedy(full_model, tokenizer):
    """Hugging Face's greedy continuation of PROMPT (8 tokens): what every generation below must give."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = full_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :])


def run(tmp_path, name: str, *args: str, **env: str) -> Script:
    logs = {k: str(tmp_path / f"{k.lower()}.log") for k in ("GPT2_SERVER_LOG", "GPT2_CLIENT_LOG", "GPT2_FULL_LOG")}
    env = user_env(**logs, GPT2_API_LOG=str(tmp_path / "api.log"), **env)
    return Script(["bash", f"scripts/{name}", *args], env, tmp_path / f"{name}.out")


@pytest.mark.parametrize("replicas", [1, 2])
def test_run_all(tmp_path, replicas, hf_greedy):
    """The README's first command: the trunk server(s), the split client app and the full-model app; a greedy
    generation in each app gives Hugging Face's tokens; Ctrl-C stops everything."""
    *servers, client_port, full_port = free_ports(replicas + 2)
    env = {"GPT2_SERVER_PORT": str(servers[0]), "GPT2_CLIENT_PORT": str(client_port), "GPT2_FULL_PORT": str(full_port)}
    if replicas > 1:
        env["GPT2_REPLICAS"] = str(replicas)
    script = run(tmp_path, "run_all.sh", **env)
    try:
        checks = {f"trunk :{p}": (lambda p=p: grpc_serving(p)) for p in servers}
        checks |= {f"app :{p}": (lambda p=p: http_ok(f"http://127.0.0.1:{p}/")) for p in (client_port, full_port)}
        script.wait_until(checks)
        assert app_generate(client_port, PROMPT) == hf_greedy  # the split app, through the trunk server(s)
        assert app_generate(full_port, PROMPT) == hf_greedy  # the full model's app
        out = script.output()
        assert f"[run_all] model {TINY} at" in out  # resolved once, by the servers' own settings code
        if replicas > 1:
            assert f"{replicas} trunk replicas: " + ",".join(f"localhost:{p}" for p in servers) in out
        script.ctrl_c([*servers, client_port, full_port])
        assert "[run_all] stopped" in script.output()
    finally:
        script.stop()


def test_run_server(tmp_path, models_dir, hf_greedy, tokenizer):
    """The trunk server alone; a split client in this process generates through it."""
    from splitcore.sampling import SamplingParams
    from tests.conftest import tiny_split_engine

    (port,) = free_ports(1)
    script = run(tmp_path, "run_server.sh", GPT2_SERVER_PORT=str(port))
    try:
        script.wait_until({f"trunk :{port}": lambda: grpc_serving(port)})
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{port}")
        try:
            result = engine.run(PROMPT, 8, SamplingParams(temperature=0))
        finally:
            engine.close()
        assert result.text == hf_greedy
        script.ctrl_c([port])
    finally:
        script.stop()


@pytest.mark.parametrize(
    ("name", "port_env"), [("run_client.sh", "GPT2_CLIENT_PORT"), ("run_full.sh", "GPT2_FULL_PORT")]
)
def test_run_app(tmp_path, server_target, hf_greedy, name, port_env):
    """One app: the split client's against a running trunk server (GPT2_TRUNK_SERVER), or the full model's."""
    (port,) = free_ports(1)
    script = run(tmp_path, name, **{port_env: str(port), "GPT2_TRUNK_SERVER": server_target})
    try:
        script.wait_until({f"app :{port}": lambda: http_ok(f"http://127.0.0.1:{port}/")})
        assert app_generate(port, PROMPT) == hf_greedy
        script.ctrl_c([port])
    finally:
        script.stop()


def test_run_api(tmp_path, server_target, hf_greedy):
    """The split client's OpenAI-compatible API against a running trunk server, called with the official client
    exactly as the README's snippet calls it."""
    from tests.test_readme import readme_openai_snippet

    (port,) = free_ports(1)
    script = run(tmp_path, "run_api.sh", GPT2_API_PORT=str(port), GPT2_TRUNK_SERVER=server_target)
    try:
        script.wait_until({f"/v1/models :{port}": lambda: http_ok(f"http://127.0.0.1:{port}/v1/models")})
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == hf_greedy
        assert readme_openai_snippet(port).strip()  # the README's own snippet runs and prints text
        script.ctrl_c([port])
    finally:
        script.stop()


def test_run_federated(tmp_path, server_target):
    """A fed server and two owners against a running trunk server: one round, the averaged adapter saved, and
    every process the script started gone when it ends."""
    from tests.conftest import CORPUS

    text, owners = CORPUS.read_text(), []
    for i in range(2):
        (tmp_path / f"owner{i}").mkdir()
        (tmp_path / f"owner{i}" / "text.txt").write_text(text[i * len(text) // 2 : (i + 1) * len(text) // 2])
        owners.append(str(tmp_path / f"owner{i}"))
    (port,) = free_ports(1)
    out = tmp_path / "fed"
    flags = ["--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--block-size", "32", "--eval-batches", "1"]
    env = {"GPT2_TRUNK_SERVER": server_target, "GPT2_FED_PORT": str(port), "GPT2_OWNERS": " ".join(owners)}
    script = run(tmp_path, "run_federated.sh", *flags, "--out", str(out), **env)
    try:
        assert script.proc.wait(300) == 0, script.output()[-3000:]
        assert "[run_federated] done" in script.output() and "round 1/1: 2 owners" in script.output()
        assert (out / "adapter_config.json").is_file()
        wait_for(lambda: not _running_with(f"{port}"), 15, "the fed server and the owners gone")
        assert port_free(port)
    finally:
        script.stop()


def _running_with(word: str) -> list[str]:
    """Command lines of the live processes that name `word` (a port: the fed server's, its owners')."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if word in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


def test_scripts_named_in_the_docs_are_tested():
    """A run script that the README or the docs name has a test here (a new one fails this until it does)."""
    import re

    named = set()
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        named |= set(re.findall(r"scripts/(run_\w+\.sh)", page.read_text()))
    source = (ROOT / "tests" / "test_run_scripts.py").read_text()
    tested = set(re.findall(r'"(run_\w+\.sh)"', source))
    assert named, "the docs name no run script"
    assert named <= tested, f"run scripts named in the docs without a test: {sorted(named - tested)}"
    assert tested <= {p.name for p in (ROOT / "scripts").glob("run_*.sh")}
