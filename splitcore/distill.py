"""A distilled student for speculative decoding: a shallower GPT-2 trained on the full model's soft labels, so that
the client can draft tokens with a model of its own (`--speculate draft:DIR`) at a fraction of the cost.

The recipe of this project's sibling systems: a 6-block student, initialised from every other block of the
teacher (embeddings, final norm and head copied); loss = alpha * T^2 * KL(teacher || student) on the
distributions softened by the temperature T, plus (1 - alpha) * cross-entropy on the next token, with T = 2 and
alpha = 0.5 (the usual "KL(softmax(s/T), softmax(t/T))" of `F.kl_div(log_softmax(s/T), softmax(t/T))`); AdamW.
The student keeps the teacher's vocabulary and tokenizer and is saved in Hugging Face's format, with what was
measured in `distill.json`. `python -m client distill` runs it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2, GPT2Config, from_state, to_state
from splitcore.settings import DistillConfig

logger = logging.getLogger(__name__)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL term, cross-entropy) for logits (B, T, vocab) predicting the next token of ids (B, T)."""
    s, t = student[:, :-1].float().flatten(0, 1), teacher[:, :-1].float().flatten(0, 1)
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean", log_target=True
    )
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def student_from(teacher: GPT2, n_layer: int) -> GPT2:
    """A student of `n_layer` blocks: blocks spread evenly over the teacher's (every other one for 6 of 12),
    the embeddings, final norm and head copied."""
    n = teacher.config.n_layer
    if not 1 <= n_layer < n:
        raise InvalidInput(f"the student needs between 1 and {n - 1} blocks (the teacher has {n}); got {n_layer}")
    picked = [round(i * n / n_layer) for i in range(n_layer)]
    state = {}
    for name, t in to_state(teacher).items():
        if name.startswith("h."):
            block, rest = name[2:].split(".", 1)
            if int(block) in picked:
                state[f"h.{picked.index(int(block))}.{rest}"] = t.clone()
        else:
            state[name] = t.clone()
    cfg = GPT2Config(**{**asdict(teacher.config), "n_layer": n_layer})
    return from_state(cfg, state, range(n_layer), True, True).requires_grad_(True)


def agreement(student: GPT2, teacher: GPT2, batches: list[torch.Tensor]) -> tuple[float, float, float]:
    """On held-out windows: (the student's cross-entropy, the share of positions where its argmax is the
    teacher's, KL(teacher || student) per position at temperature 1)."""
    ce, kl, same, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            s, t = student(b, all_positions=True)[:, :-1].float(), teacher(b, all_positions=True)[:, :-1].float()
            n = b[:, 1:].numel()
            ce += float(F.cross_entropy(s.flatten(0, 1), b[:, 1:].reshape(-1))) * n
            kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True))
            same += int((s.argmax(-1) == t.argmax(-1)).sum())
            total += n
    total = max(total, 1)
    return ce / total, same / total, kl / total


def distill(cfg: DistillConfig, progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train a student of `cfg.teacher` on `cfg.data` and save it in `cfg.out`; returns what was measured."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from splitcore.checkpoint import save_hf
    from splitcore.models import load_tokenizer, resolve_model
    from splitcore.parts import load_full
    from splitcore.training import TextData, fit

    cfg.check()
    spec = resolve_model(cfg.teacher, cfg.models_dir)
    tok = load_tokenizer(spec.path)
    data = TextData.from_path(cfg.data, tok.encode, cfg.block_size, eval_fraction=0.05)
    teacher = load_full(spec)
    student = student_from(teacher, cfg.n_layer)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    evals = data.eval_batches(cfg.batch_size, 4)
    before, t0 = agreement(student, teacher, evals), time.perf_counter()

    def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            soft = teacher(batch, all_positions=True)
        loss, kl, ce = kd_loss(student(batch, all_positions=True), soft, batch, cfg.temperature, cfg.alpha)
        return loss, {"loss": float(loss.detach()), "kl": float(kl.detach()), "ce": float(ce.detach())}

    def batch_of(step: int) -> torch.Tensor:
        return data.batch(step, cfg.batch_size, cfg.seed)

    fit(student, opt, cfg.steps, cfg.lr, max(1, cfg.steps // 20), batch_of, loss_of, progress)
    after = agreement(student, teacher, evals)
    report = {
        "teacher": spec.spec,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out", "models_dir")},
        "train_tokens": len(data.train),
        "held_out_tokens": len(data.held_out),
        "held_out_perplexity_before": math.exp(min(before[0], 50)),
        "held_out_perplexity_after": math.exp(min(after[0], 50)),
        "argmax_agreement_with_teacher_before": before[1],
        "argmax_agreement_with_teacher_after": after[1],
        "held_out_kl_before": before[2],
        "held_out_kl_after": after[2],
        "train_seconds": time.perf_counter() - t0,
    }
    hf_cfg = HFConfig(**{**spec.config.to_dict(), "n_layer": cfg.n_layer})
    save_hf(student.eval(), GPT2LMHeadModel(hf_cfg), Path(cfg.out), tok, report, "distill.json")
    return report


def load_student(spec: str, models_dir: str, vocab_size: int, device: torch.device, dtype: torch.dtype) -> GPT2:
    """A draft model for `--speculate draft:SPEC`; its vocabulary must be the generating model's."""
    from splitcore.models import resolve_model
    from splitcore.parts import load_full

    resolved = resolve_model(spec, models_dir)
    if resolved.config.vocab_size != vocab_size:
        raise InvalidInput(
            f"the draft model {spec} has a vocabulary of {resolved.config.vocab_size} tokens, the model "
            f"{vocab_size}: a draft must share the model's tokenizer (python -m client distill makes one)"
        )
    return load_full(resolved, device, dtype)


def report_line(path: str | Path) -> str:
    d = json.loads((Path(path) / "distill.json").read_text())
    return (
        f"student of {d['teacher']}: held-out perplexity {d['held_out_perplexity_before']:.1f} -> "
        f"{d['held_out_perplexity_after']:.1f}, argmax agreement with the teacher "
        f"{d['argmax_agreement_with_teacher_before']:.2f} -> {d['argmax_agreement_with_teacher_after']:.2f}"
    )
