"""Distilling a draft model (`python -m client distill`) and drafting with it (`--speculate draft:DIR`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from splitcore.distill import DistillConfig, distill, kd_loss, student_from
from splitcore.errors import InvalidInput
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from tests.conftest import CORPUS, ROOT, TINY, load_hf_model, subprocess_env, tiny_split_engine

GREEDY = SamplingParams(temperature=0.0)


def test_kd_loss_is_the_recipe():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    loss, kl, ce = kd_loss(s, t, ids, 2.0, 0.5)
    p_t = torch.softmax(t[:, :-1] / 2, -1)
    manual_kl = (p_t * (p_t.log() - torch.log_softmax(s[:, :-1] / 2, -1))).sum(-1).mean()  # KL(teacher || student)
    assert float(kl) == pytest.approx(float(manual_kl), rel=1e-5)
    assert float(ce) == pytest.approx(float(F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))))
    assert float(loss) == pytest.approx(0.5 * 4 * float(kl) + 0.5 * float(ce), rel=1e-6)
    assert float(kd_loss(t, t, ids, 2.0, 1.0)[0]) == pytest.approx(0.0, abs=1e-6)  # a perfect student


def test_student_starts_from_every_other_block(tiny):
    teacher = load_full(tiny)
    student = student_from(teacher, 6)
    assert student.config.n_layer == 6
    for j, i in enumerate([0, 2, 4, 6, 8, 10]):
        assert torch.equal(student.h[str(j)].mlp.c_fc.weight, teacher.h[str(i)].mlp.c_fc.weight)
    assert torch.equal(student.wte.weight, teacher.wte.weight) and student.lm_head.weight is student.wte.weight
    with pytest.raises(InvalidInput, match="between 1 and 11 blocks"):
        student_from(teacher, 12)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, models_dir, tiny):
    out = tmp_path_factory.mktemp("distill") / "student"
    losses = []
    cfg = DistillConfig(
        teacher=TINY,
        data=str(CORPUS),
        out=str(out),
        steps=30,
        batch_size=4,
        block_size=32,
        lr=2e-3,
        alpha=1.0,
        models_dir=str(models_dir),
    )
    report = distill(cfg, lambda step, m: losses.append(m["kl"]))
    return out, losses, report


@pytest.mark.slow
def test_distilling_brings_the_student_to_the_teacher(student_dir, tiny):
    out, losses, report = student_dir
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])  # the KL term falls
    assert report["held_out_kl_after"] < report["held_out_kl_before"]  # and on text it has not seen
    hf = load_hf_model(out)  # Hugging Face's own loader reads it
    assert hf.config.n_layer == 6 and hf.config.vocab_size == 50257
    ours = load_full(__import__("splitcore.models", fromlist=["resolve_model"]).resolve_model(str(out)))
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    with torch.no_grad():
        assert float((hf(ids).logits[0, -1] - ours(ids)[0]).abs().max()) < 1e-4
    assert json.loads((out / "distill.json").read_text())["teacher"] == TINY


@pytest.mark.slow
def test_draft_model_speculation_gives_plain_greedy(student_dir, models_dir, server):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{server.port}")
    spec = f"draft:{student_dir[0]}"
    for prompt in ["The history of natural language processing", "Once upon a time"]:
        plain = engine.run(prompt, 30, GREEDY)
        drafted = engine.run(prompt, 30, GREEDY, speculate=spec)
        assert drafted.token_ids == plain.token_ids
        assert drafted.stats.speculation.source == spec and drafted.stats.speculation.drafted > 0
    with pytest.raises(InvalidInput, match="--speculate must be one of"):
        engine.run("hi", 3, GREEDY, speculate="draft:")
    engine.close()


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, models_dir, server):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "odd")
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{server.port}")
    with pytest.raises(InvalidInput, match="vocabulary of 100 tokens"):
        engine.run("hi", 3, GREEDY, speculate=f"draft:{tmp_path / 'odd'}")
    engine.close()


def test_distill_cli_shows_progress_and_bad_input_is_one_line(tmp_path, models_dir):
    base = [sys.executable, "-m", "client", "distill", "--teacher", TINY, "--models-dir", str(models_dir)]
    run = lambda *a: subprocess.run(  # noqa: E731
        base + list(a), capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300
    )
    ok = run(
        "--data",
        str(CORPUS),
        "--out",
        str(tmp_path / "s"),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--block-size",
        "16",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "step 4/4" in ok.stderr and "draft:" in ok.stdout and (tmp_path / "s" / "config.json").exists()
    for args, message in [
        (("--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "t")), "does not exist"),
        (("--data", str(CORPUS), "--out", str(tmp_path / "s")), "exists and is not empty"),
        (("--data", str(CORPUS)), "--out is required"),
    ]:
        bad = run(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_full_model_drafts_with_the_student_too(student_dir, tiny):
    from splitcore.engine import FullEngine

    engine = FullEngine(tiny, torch.device("cpu"), torch.float32)
    spec = f"draft:{student_dir[0]}"
    assert (
        engine.run("Once upon a time", 24, GREEDY, speculate=spec).token_ids
        == engine.run("Once upon a time", 24, GREEDY).token_ids
    )


def test_app_with_a_missing_draft_model_fails_at_start_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "baseline", "serve", "--model", TINY, "--device", "cpu", "--port", "1"]
    out = subprocess.run(
        cmd + ["--speculate", f"draft:{tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr, out.stderr
