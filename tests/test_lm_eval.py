"""EleutherAI's lm-evaluation-harness, the real package, against the API: `python -m client api` over a live trunk
server and `python -m baseline api`, with the harness's `local-completions` model and its default (tokenized)
requests, offline, on local tasks made here. Split and full score the same, and their log-likelihoods are HF's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, free_port, start_tiny_server, subprocess_env, wait_for

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    ("In the beginning God created the heaven", " and the earth", " of the sea"),
    ("And the earth was without form, and", " void", " full"),
    ("And God said, Let there be", " light", " darkness"),
    ("And God saw the light, that it was", " good", " bad"),
    ("And the evening and the morning were the first", " day", " night"),
    ("Blessed are the meek: for they shall inherit", " the earth", " the sky"),
]


def write_tasks(d: Path) -> None:
    """Three tasks on local JSON files: generation until a newline, a two-choice question, and perplexity."""
    rows = [{"context": c, "choices": [a, b], "label": 0, "text": c + a + "."} for c, a, b in DOCS]
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\ntest_split: test\n"
    (d / "split_gen.yaml").write_text(
        "task: split_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
        "  temperature: 0\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (d / "split_choice.yaml").write_text(
        "task: split_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (d / "split_ppl.yaml").write_text(
        "task: split_ppl\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )


def start_api(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", *args, "--model", TINY, "--device", "cpu", "--port", str(port)]
    cmd += ["--log-file", str(log)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=ROOT
    )
    line = p.stdout.readline()
    if "OpenAI-compatible API on" not in line:
        p.kill()
        raise RuntimeError(f"the API did not start: {line!r} {p.stdout.read()[-2000:]}")
    import httpx

    wait_for(lambda: _up(httpx, port), 30, "the API answering")
    return p, f"http://127.0.0.1:{port}/v1/completions"


def _up(httpx, port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def evaluate(url: str, tasks_dir: Path, tokenizer: str) -> dict:
    """One harness run of the three tasks against `url`, as a user runs it (its defaults: tokenized requests)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="local-completions",
        model_args={"model": TINY, "base_url": url, "tokenizer": tokenizer, "max_retries": 1, "num_concurrent": 2},
        tasks=["split_gen", "split_choice", "split_ppl"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


@pytest.fixture(scope="module")
def runs(models_dir, tiny, tmp_path_factory):
    """The harness's results against the split API and against the full model's API."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    d = tmp_path_factory.mktemp("lm_eval")
    write_tasks(d)
    srv = start_tiny_server(models_dir, max_sessions=16, grace_s=0.5)
    split, split_url = start_api(["client", "api", "--server", f"127.0.0.1:{srv.port}"], d / "split.log")
    full, full_url = start_api(["baseline", "api"], d / "full.log")
    try:
        yield {"split": evaluate(split_url, d, str(tiny.path)), "full": evaluate(full_url, d, str(tiny.path))}
    finally:
        for p in (split, full):
            p.terminate()
            p.wait(timeout=30)
        srv.stop(0.5)


def _metric(results: dict, task: str, metric: str) -> float:
    return results["results"][task][f"{metric},none"]


def test_split_and_full_score_the_same(runs):
    split, full = runs["split"], runs["full"]
    assert _metric(split, "split_choice", "acc") == _metric(full, "split_choice", "acc")
    assert _metric(split, "split_gen", "exact_match") == _metric(full, "split_gen", "exact_match")
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = _metric(split, "split_ppl", m), _metric(full, "split_ppl", m)
        assert abs(a - b) <= 1e-4 * abs(b), (m, a, b)
    gen = [s["filtered_resps"] for s in split["samples"]["split_gen"]]
    assert gen == [s["filtered_resps"] for s in full["samples"]["split_gen"]]
    assert len(gen) == len(DOCS) and any(g[0] for g in gen)  # the same generations, not all empty


def test_log_likelihoods_are_hf_s(runs, full_model, tokenizer):
    """Each choice's log-likelihood, as the harness read it from the API, equals HF's own within 1e-4."""
    for which in ("split", "full"):
        for s in runs[which]["samples"]["split_choice"]:
            context = s["doc"]["context"]
            for (loglik, _), choice in zip((r[0] for r in s["resps"]), s["doc"]["choices"], strict=True):
                ctx, cont = (
                    tokenizer.encode(context),
                    tokenizer.encode(context + choice)[len(tokenizer.encode(context)) :],
                )
                ids = ctx + cont
                with torch.no_grad():
                    lp = torch.log_softmax(full_model(torch.tensor([ids])).logits[0].float(), dim=-1)
                want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
                assert abs(loglik - want) < 1e-4, (which, context, choice, loglik, want)
