"""EleutherAI's lm-evaluation-harness, the real package, against the API: `python -m client api` over a live trunk
server and `python -m baseline api`, with the harness's `local-completions` model and its default (tokenized)
requests, offline, on local tasks made here. Split and full score the same, and their log-likelihoods are HF's."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, free_port, start_tiny_server

pytestmark = pytest.mark.slow  # the harness and its API servers: ~30 s to set up

lm_eval = pytest.importorskip("lm_eval")

from scripts.eval_harness import evaluate, metric, start_api, write_tasks  # noqa: E402

DOCS = [
    ("In the beginning God created the heaven", " and the earth", " of the sea"),
    ("And the earth was without form, and", " void", " full"),
    ("And God said, Let there be", " light", " darkness"),
    ("And God saw the light, that it was", " good", " bad"),
    ("And the evening and the morning were the first", " day", " night"),
    ("Blessed are the meek: for they shall inherit", " the earth", " the sky"),
]


@pytest.fixture(scope="module")
def runs(models_dir, tiny, tmp_path_factory):
    """The harness's results against the split API and against the full model's API."""
    d = tmp_path_factory.mktemp("lm_eval")
    rows = [{"context": c, "choices": [a, b], "label": 0, "text": c + a + "."} for c, a, b in DOCS]
    write_tasks(d, rows)
    srv = start_tiny_server(models_dir, max_sessions=16, grace_s=0.5)
    model = ["--model", TINY, "--device", "cpu"]
    split, split_url = start_api(
        ["client", "api", "--server", f"127.0.0.1:{srv.port}", *model], free_port(), d / "s.log"
    )
    full, full_url = start_api(["baseline", "api", *model], free_port(), d / "full.log")
    try:
        yield {
            "split": evaluate(split_url, TINY, d, str(tiny.path)),
            "full": evaluate(full_url, TINY, d, str(tiny.path)),
        }
    finally:
        for p in (split, full):
            p.terminate()
            p.wait(timeout=30)
        srv.stop(0.5)


@pytest.mark.slow
def test_split_and_full_score_the_same(runs):
    split, full = runs["split"], runs["full"]
    assert metric(split, "split_choice", "acc") == metric(full, "split_choice", "acc")
    assert metric(split, "split_gen", "exact_match") == metric(full, "split_gen", "exact_match")
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = metric(split, "split_ppl", m), metric(full, "split_ppl", m)
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
