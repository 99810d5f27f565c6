"""scripts/bench.py end to end on the tiny model: every config measured, bytes and profile consistent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, subprocess_env


def run_bench(tmp_path, models_dir, *args: str) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/bench.py", "--model", TINY, "--models-dir", str(models_dir), "--json", str(out)]
    p = subprocess.run(cmd + list(args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()) | {"stdout": p.stdout}


@pytest.mark.slow
def test_bench_compares_every_config(tmp_path, models_dir, tiny):
    d = run_bench(tmp_path, models_dir, "--quick", "--prompt-lengths", "8,64", "--plot", str(tmp_path / "p.html"))
    rows = {(r["config"], r["prompt_tokens"]): r for r in d["results"]}
    names = ["full", "split session fp32", "split session fp16 wire", "split stateless fp32"]
    names.append("split session +25 ms each way")
    assert set(rows) == {(n, p) for n in names for p in (8, 64)}
    hidden = tiny.config.n_embd * 4
    for p in (8, 64):
        fp32, fp16 = rows[("split session fp32", p)], rows[("split session fp16 wire", p)]
        assert hidden < fp32["bytes_out_per_token"] < hidden + 64  # one hidden vector plus framing
        assert fp16["bytes_out_per_token"] < fp32["bytes_out_per_token"] / 2 + 32
        assert rows[("split session +25 ms each way", p)]["decode_median_ms"] >= 50  # the delay is really there
        assert all(r["decode_median_ms"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    # session bytes per decode step do not grow with the context; stateless ones do
    assert (
        rows[("split session fp32", 8)]["bytes_out_per_token"]
        == rows[("split session fp32", 64)]["bytes_out_per_token"]
    )
    assert (
        rows[("split stateless fp32", 64)]["bytes_out_per_token"]
        > 4 * rows[("split stateless fp32", 8)]["bytes_out_per_token"]
    )
    for agreement in d["fp16_wire"].values():
        assert agreement["steps"] == d["new_tokens"] and 0 <= agreement["greedy_agreement"] <= agreement["steps"]
        assert 0 < agreement["max_abs_logit_diff"] < 0.05
    assert "| 64 | split session fp32 |" in d["stdout"]
    assert d["placement"] == {"device": "cpu", "dtype": "float32", "cuda_graphs": "on"}
    assert d["checks"] == {"8": {}, "64": {}}  # graphs and float16 checks run where they mean something: a GPU
    assert (tmp_path / "p.html").read_text().count("plotly") > 1


@pytest.mark.slow
def test_bench_profile_measures_each_part(tmp_path, models_dir, tiny):
    d = run_bench(tmp_path, models_dir, "--profile", "--prompt-lengths", "8", "--new-tokens", "8", "--repeats", "2")
    prof = d["profile"]["8"]
    assert set(prof) == {"full", "split, trunk in-process", "split over gRPC"}
    grpc_ = prof["split over gRPC"]
    parts = ["bottom", "trunk", "server_handling", "transport", "codec", "top", "head"]
    assert all(grpc_[k] > 0 for k in parts)
    # each part is timed where it happens; what no timer covers (argmax, stepper and link overhead) is small
    assert 0 <= grpc_["other"] < 0.25 * grpc_["total"]
    local = prof["split, trunk in-process"]
    assert all(local[k] > 0 for k in ("bottom", "trunk", "top", "head"))
    assert 0 <= local["other"] < 0.25 * local["total"]
    assert "gRPC transport, both ways" in d["stdout"]


def run_script(tmp_path, models_dir, script: str, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, f"scripts/{script}.py", "--model", TINY, "--models-dir", str(models_dir), "--json", str(out)]
    p = subprocess.run(cmd + list(args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()) | {"stdout": p.stdout}


@pytest.mark.slow
def test_bench_loop_measures_the_serving_path(tmp_path, models_dir, tiny):
    args = ["--sessions", "1,4", "--seconds", "0.5"]
    d = run_script(tmp_path, models_dir, "bench_loop", *args)
    rows = {r["sessions"]: r for r in d["rows"]}
    assert set(rows) == {1, 4}
    assert all(r["steps_per_s"] > 0 for r in rows.values())
    assert rows[1]["mean_batch"] == 1.0 and rows[4]["mean_batch"] >= 2  # the four met in batches
    assert "| 4 |" in d["stdout"]


@pytest.mark.slow
def test_bench_server_runs_replicas_side_by_side(tmp_path, models_dir, tiny):
    """bench_server on the simulated device, one replica and two behind the client's round robin: every (setting,
    N) measured, with each replica's own metrics read around each run."""
    args = ["--simulate-device-ms", "0.5", "--sessions", "1,4", "--steps", "24", "--prompt", "4", "--client-procs", "1"]
    d = run_script(tmp_path, models_dir, "bench_server", *args, "--replicas", "1,2")
    got = {(r["config"], r["sessions"]): r for r in d["rows"]}
    names = ["1 replica", "2 replicas"]
    assert set(got) == {(c, n) for c in names for n in (1, 4)}
    for r in got.values():
        assert r["tokens_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert 1.0 <= r["mean_batch"] <= r["sessions"] and 0 < r["busy_share"] <= 1
        # the servers' threads, found by the names they give them in the operating system
        assert {"grpc-loop", "trunk-scheduler"} <= set(r["thread_cpu"]) and r["loop_cpu"] <= r["server_cpu"]
        assert len(r["replica_step_shares"]) == r["replicas"] and sum(r["replica_step_shares"]) == pytest.approx(1)
        assert r["x_one_replica"] == pytest.approx(r["tokens_per_s"] / got["1 replica", r["sessions"]]["tokens_per_s"])
    # four sessions, turned to two each (independent round robins would put all four on one 1 time in 8)
    assert got["2 replicas", 4]["replica_step_shares"] == pytest.approx([0.5, 0.5])
    assert sum(r["loop_cpu"] for r in got.values()) > 0  # /proc counts in ticks of 10 ms: short runs may show 0
    # the load's client processes, and the host's busy cores (what says whether the host is the bound)
    assert sum(r["clients_cpu"] for r in got.values()) > 0 and sum(r["host_cpu"] for r in got.values()) > 0
    assert "SIMULATED device of 0.5 ms" in d["stdout"]
    assert d["complete"] is True  # (written after each row too, with False, for a run cut short)


def test_bench_compress_measures_each_method_and_recovers(tmp_path, models_dir, tiny):
    import shutil

    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed (scripts/test.sh installs it)")
    out = tmp_path / "compress.json"
    cmd = [sys.executable, "scripts/bench_compress.py", "--models", TINY, "--models-dir", str(models_dir)]
    cmd += ["--methods", "none,prune:0.5,prune24,int8", "--prompts", "2", "--tokens", "6", "--ppl-windows", "2"]
    cmd += ["--rounds", "1", "--timing-tokens", "4", "--recover-models", TINY, "--recover-steps", "3"]
    cmd += ["--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (result,) = json.loads(out.read_text())["models"]
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["none", "prune:0.5", "prune24", "int8"]
    assert rows["none"]["sparsity"] == 0 and abs(rows["prune:0.5"]["sparsity"] - 0.5) < 1e-3
    assert abs(rows["prune24"]["sparsity"] - 0.5) < 1e-3
    assert rows["int8"]["weight_MiB"] < rows["none"]["weight_MiB"] == rows["prune:0.5"]["weight_MiB"]
    assert all(r["perplexity"] > 1 and r["full_ms"] > 0 and r["split_ms"] > 0 for r in rows.values())
    assert all(0 <= r["token_agreement"] <= 1 for r in rows.values())
    recovery = result["recovery"]
    assert recovery["steps"] == 3 and recovery["pruned"]["compress"] == "prune:0.5"
    assert recovery["control"]["compress"] == "none" and recovery["pruned"]["perplexity_after"] > 1
    assert "| prune24 | 50% |" in p.stdout and out.with_suffix(".html").read_text().count("plotly") > 1
