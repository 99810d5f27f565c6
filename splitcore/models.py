"""Resolve a model spec (hub id, local directory, random preset) to a checkpoint directory; used by every process."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from splitcore.checkpoint import bundled_tokenizer, publish
from splitcore.errors import ModelSpecError

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
TRAINED_PREFIX = "trained:"  # small models trained here on public-domain text (splitcore/presets.py)
RANDOM_SEED = 20261122  # every process builds the same random weights from this seed
RANDOM_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "tiny": dict(n_layer=12, n_embd=64, n_head=4, n_positions=1024),
}
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]
DEFAULT_MODEL = "gpt2"


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec turned into a local Hugging Face-format directory."""

    spec: str  # what the user asked for, e.g. "gpt2", "./my-model", "random:tiny"
    path: Path  # directory with config.json and weights
    is_random: bool  # True for offline random-weight presets: text is gibberish
    config: GPT2Config

    @property
    def name(self) -> str:
        return self.spec


def load_tokenizer(path: Path) -> GPT2TokenizerFast:
    """The tokenizer saved with a checkpoint, or the bundled GPT-2 one when the directory has none."""
    if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
        return GPT2TokenizerFast.from_pretrained(str(path))
    return bundled_tokenizer()


def _read_config(path: Path) -> GPT2Config:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelSpecError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{cfg_file} is not valid JSON: {e}") from e
    if raw.get("model_type") != "gpt2":
        raise ModelSpecError(
            f"{path} holds a '{raw.get('model_type')}' model; only the GPT-2 architecture (model_type "
            f"'gpt2': gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) can be split"
        )
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ModelSpecError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    return GPT2Config.from_pretrained(str(path))


def _materialise_random(name: str, models_dir: Path) -> Path:
    if name not in RANDOM_PRESETS:
        raise ModelSpecError(
            f"unknown random preset '{RANDOM_PREFIX}{name}'; choose one of "
            + ", ".join(RANDOM_PREFIX + p for p in RANDOM_PRESETS)
        )
    target = models_dir / f"random-{name}"
    if (target / "config.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building random-weight preset %s%s (seed %d) in %s", RANDOM_PREFIX, name, RANDOM_SEED, target)
    config = GPT2Config(vocab_size=50257, **RANDOM_PRESETS[name])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_SEED)
    try:
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(gen_state)
    tmp = Path(tempfile.mkdtemp(prefix=f".random-{name}-", dir=models_dir))
    model.save_pretrained(str(tmp))  # then loaded back through the same code as any user's checkpoint
    bundled_tokenizer().save_pretrained(str(tmp))
    publish(tmp, target)
    return target


def _materialise_trained(name: str, models_dir: Path) -> Path:
    from splitcore import presets

    if name not in presets.RECIPES:
        raise ModelSpecError(
            f"unknown trained preset '{TRAINED_PREFIX}{name}'; choose one of "
            + ", ".join(TRAINED_PREFIX + p for p in presets.RECIPES)
        )
    target = models_dir / f"trained-{name}"
    if (target / "config.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    recipe = presets.RECIPES[name]
    logger.info("building the trained preset %s%s in %s (once)", TRAINED_PREFIX, name, target)
    from tqdm import tqdm

    with tqdm(total=recipe.steps, desc=f"training {TRAINED_PREFIX}{name} (once)", unit="step") as bar:
        report = presets.build(name, target, recipe, lambda step, loss: (bar.update(1), bar.set_postfix(loss=loss)))
    logger.info(
        "%s%s: held-out perplexity %.1f -> %.1f in %.0f s",
        TRAINED_PREFIX,
        name,
        report["held_out_perplexity_before"],
        report["held_out_perplexity_after"],
        report["train_seconds"],
    )
    return target


def _download(repo_id: str, models_dir: Path) -> Path:
    target = models_dir / repo_id.replace("/", "--")
    if (target / "config.json").exists():
        return target
    from huggingface_hub import snapshot_download

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{target.name}-", dir=models_dir))
    logger.info("downloading %s from the Hugging Face hub into %s", repo_id, target)
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(tmp), allow_patterns=HUB_FILES)
    except Exception as e:  # network, 404, auth: all mean "cannot get it"
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelSpecError(
            f"could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {reason[:160]}); "
            f"check the name and your network, or use a local directory or an offline preset such as "
            f"random:gpt2"
        ) from e
    publish(tmp, target)
    return target


def resolve_model(spec: str, models_dir: Path | str = "models") -> ResolvedModel:
    """Turn a model spec into a local directory, downloading a hub model once into `models_dir`."""
    models_dir = Path(models_dir)
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec; use a hub id (gpt2), a directory, or random:gpt2")
    if spec.startswith(RANDOM_PREFIX):
        path = _materialise_random(spec[len(RANDOM_PREFIX) :], models_dir)
        return ResolvedModel(spec, path, True, _read_config(path))
    if spec.startswith(TRAINED_PREFIX):
        path = _materialise_trained(spec[len(TRAINED_PREFIX) :], models_dir)
        return ResolvedModel(spec, path, False, _read_config(path))
    local = Path(spec).expanduser()
    if local.is_dir():
        return ResolvedModel(spec, local, False, _read_config(local))
    if spec.startswith((".", "/", "~")) or local.exists():
        raise ModelSpecError(f"model directory '{spec}' does not exist")
    path = _download(spec, models_dir)
    return ResolvedModel(spec, path, False, _read_config(path))


def resolve_with_fallback(spec: str, models_dir: Path | str, fallback_random: bool) -> ResolvedModel:
    """Like resolve_model, but the default `gpt2` falls back to `random:gpt2`, loudly, when it can't be had."""
    try:
        return resolve_model(spec, models_dir)
    except ModelSpecError as e:
        if not (fallback_random and spec == DEFAULT_MODEL):
            raise
        logger.warning("!" * 78)
        logger.warning("%s", e)
        logger.warning("FALLING BACK TO random:gpt2: real GPT-2 shape, RANDOM WEIGHTS, the text is gibberish")
        logger.warning("!" * 78)
        return resolve_model(RANDOM_PREFIX + DEFAULT_MODEL, models_dir)
