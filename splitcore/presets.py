"""Trained offline presets: small GPT-2 models trained here on public-domain text, for what needs a real
distribution where no weights can be downloaded (benchmarks, speculative decoding, fine-tuning demos).

`trained:kjv` is the GPT-2 tokenizer and a 12-block GPT-2 of width 128 trained from scratch on the Old Testament
of the King James Version of the Bible (1611; public domain), whose text comes from Debian's `bible-kjv`
package (`apt-get install bible-kjv`; its `bible` program prints it). The New Testament stays unseen, for
fine-tuning demos: new text in the same language. The recipe runs once (a few minutes on a laptop
CPU) and the result is cached in the models directory in Hugging Face format, like any downloaded model.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitcore.errors import ModelSpecError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    n_layer: int = 12
    n_embd: int = 128
    n_head: int = 4
    lr: float = 2e-3  # peak, after a linear warm-up, then cosine to a tenth
    warmup: int = 20  # steps of the warm-up
    steps: int = 400  # optimizer steps
    batch_size: int = 8
    block_size: int = 128
    seed: int = 20261122


RECIPES = {"kjv": Recipe()}


OLD_TESTAMENT = "Gen1:1-Mal4:6"  # what trained:kjv learns from
NEW_TESTAMENT = "Matt1:1-Rev22:21"  # left unseen, for fine-tuning demos and benchmarks


def kjv_text(passages: str = "Gen1:1-Rev22:21") -> str:
    """The KJV as plain prose: Debian's `bible` program prints it; verse numbers and headings are dropped."""
    if shutil.which("bible") is None:
        raise ModelSpecError(
            "the trained:kjv preset is built from the King James Bible in Debian's bible-kjv package, which is not "
            "installed: apt-get install bible-kjv (scripts/test.sh does it when it can)"
        )
    raw = subprocess.run(["bible", passages], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"^\s*\d+\s+", "", line) for line in raw.splitlines() if line.strip()]
    lines = [line for line in lines if not re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", line.strip())]
    return " ".join(lines)


def build(
    name: str, target: Path, recipe: Recipe | None = None, progress: Callable[[int, float], None] | None = None
) -> dict:
    """Train the preset `name` and save it at `target` (HF format with the tokenizer); returns what was measured."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from splitcore.checkpoint import bundled_tokenizer, save_hf
    from splitcore.gpt2 import GPT2Config, from_state
    from splitcore.training import TextData, fit, lm_loss

    r = recipe or RECIPES[name]
    tok = bundled_tokenizer()
    data = TextData.from_path(_text_file(kjv_text(OLD_TESTAMENT)), tok.encode, r.block_size, eval_fraction=0.05)
    hf_cfg = HFConfig(n_layer=r.n_layer, n_embd=r.n_embd, n_head=r.n_head, n_positions=1024, vocab_size=50257)
    torch.manual_seed(r.seed)
    hf = GPT2LMHeadModel(hf_cfg)  # HF's initialisation, then trained as our core
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    cfg = GPT2Config.from_hf(hf_cfg)
    model = from_state(cfg, state, range(r.n_layer), True, True).requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.1, betas=(0.9, 0.95))
    evals = data.eval_batches(r.batch_size, 8)

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(lm_loss(model(b, all_positions=True), b)) for b in evals) / len(evals)

    def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        loss = lm_loss(model(batch, all_positions=True), batch)
        return loss, float(loss.detach())

    before, t0 = held_out(), time.perf_counter()
    fit(model, opt, r.steps, r.lr, r.warmup, lambda step: data.batch(step, r.batch_size, r.seed), loss_of, progress)
    after = held_out()
    report = {
        "recipe": asdict(r),
        "text": "King James Version (1611, public domain), Old Testament, from Debian's bible-kjv package",
        "train_tokens": len(data.train),
        "held_out_tokens": len(data.held_out),
        "held_out_perplexity_before": math.exp(before),
        "held_out_perplexity_after": math.exp(after),
        "train_seconds": time.perf_counter() - t0,
    }
    save_hf(model, hf, target, tok, report, "preset.json")
    return report


def _text_file(text: str) -> Path:
    f = Path(tempfile.mkdtemp(prefix="kjv-")) / "kjv.txt"
    f.write_text(text, encoding="utf-8")
    return f
