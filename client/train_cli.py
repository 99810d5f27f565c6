"""`python -m client train`: a fine-tuning run across the split (or --local) with a progress bar, held-out
perplexity, checkpoints and --resume; the first Ctrl-C stops after the current step and saves."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from client.config import ClientConfig
from client.split_engine import SplitEngine
from client.split_training import (
    LocalTrainer,
    Run,
    SplitTrainer,
    TrainConfig,
    check_client_train,
    latest_checkpoint,
    load_checkpoint,
)
from splitcore.compress import Compression
from splitcore.device import resolve_device, resolve_dtype
from splitcore.errors import InvalidInput
from splitcore.models import load_tokenizer, resolve_with_fallback
from splitcore.parts import Split
from splitcore.training import TextData


def train_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if not cfg.data:
        raise InvalidInput("--data is required: a text file, or a directory of .txt files")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.block_size < 2 or cfg.eval_every < 0 or cfg.eval_batches < 1:
        raise InvalidInput(
            f"need --steps >= 1, --batch-size >= 1, --block-size >= 2, --eval-every >= 0 and --eval-batches >= 1; "
            f"got {cfg.steps}, {cfg.batch_size}, {cfg.block_size}, {cfg.eval_every}, {cfg.eval_batches}"
        )
    check_client_train(cfg.client_train)
    return cfg


def _resume_state(cfg: TrainConfig):
    out = Path(cfg.out)
    found = latest_checkpoint(out)
    if not cfg.resume:
        if found is not None:
            raise InvalidInput(
                f"{out} already holds {found.name}: add --resume to go on from it, or pick another --out"
            )
        return None, 0, None
    if found is None:
        raise InvalidInput(f"--resume: no checkpoint in {out}")
    weights, moments, opt_steps, step, log = load_checkpoint(found)
    print(f"resuming from {found} (step {step})", file=sys.stderr)
    return (weights, moments, opt_steps), step, log


def _trainer(args: argparse.Namespace, ccfg: ClientConfig, cfg: TrainConfig, resume):
    """(trainer, encode, model spec, model context)"""
    if args.local:
        if cfg.privacy_weight or ccfg.noise().active:
            raise InvalidInput("--local trains without a cut: defences and --privacy-weight need the split")
        device = resolve_device(ccfg.device)
        model = resolve_with_fallback(ccfg.model, ccfg.models_dir, ccfg.fallback_random)
        n_layer = model.config.n_layer
        split = Split.parse(ccfg.split, n_layer)
        layers = list(range(n_layer)) if cfg.client_train == "lora" else list(split.layers("trunk", n_layer))
        dtype, full = resolve_dtype(ccfg.dtype, device), cfg.client_train == "full"
        mine = Compression.parse(ccfg.compress)
        trunk = mine if ccfg.trunk_compress is None else Compression.parse(ccfg.trunk_compress)
        compress = [(trunk, split.layers("trunk", n_layer))]
        compress += [(mine, split.layers(p, n_layer)) for p in ("bottom", "top")]
        trainer = LocalTrainer(model, layers, cfg.lora(), resume, device, dtype, full, compress)
        return trainer, load_tokenizer(model.path).encode, model.spec, model.config.n_positions
    if ccfg.local_trunk:
        raise InvalidInput("train runs the trunk on a server; for everything in this process use --local")
    engine = SplitEngine(ccfg)
    engine.check_server()
    classes = None
    if cfg.privacy_weight > 0:  # the adversary reads among the tokens of the client's text
        from client.privacy import vocabulary

        classes = vocabulary(TextData.from_path(cfg.data, engine.encode, cfg.block_size).train)
    trainer = SplitTrainer(engine, cfg.lora(), cfg.client_train, resume, cfg.privacy_weight, classes)
    return trainer, engine.encode, engine.model.spec, engine.n_positions


def run_train(args: argparse.Namespace, ccfg: ClientConfig) -> None:
    cfg = train_config(args)
    cfg.lora().check(10**6)  # the settings alone; the width is checked against the model's where it's applied
    resume, start, log = _resume_state(cfg)
    trainer, encode, base, context = _trainer(args, ccfg, cfg, resume)
    try:
        if cfg.block_size > context:
            raise InvalidInput(f"--block-size {cfg.block_size} is past the model's context of {context} tokens")
        data = TextData.from_path(cfg.data, encode, cfg.block_size)
        where = "in this process (--local)" if args.local else f"trunk on {ccfg.server}"
        print(
            f"training a LoRA adapter (rank {cfg.lora_rank}) {where}: {len(data.train):,} training tokens, "
            f"{len(data.held_out):,} held out, {cfg.steps} steps of {cfg.batch_size}x{cfg.block_size}",
            file=sys.stderr,
        )
        run = Run(trainer, data, cfg, base, start, log)
        _stop_on_ctrl_c(run)
        _show(run, cfg, start)
    finally:
        trainer.close()


def _stop_on_ctrl_c(run: Run) -> None:
    def first(signum, frame):
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)
        run.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, first)


def _show(run: Run, cfg: TrainConfig, start: int) -> None:
    bar = tqdm(total=cfg.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)
    tokens = cfg.batch_size * cfg.block_size
    for ev in run:
        if ev.kind == "step":
            s = ev.stats
            bar.update(1)
            kb = (s.bytes_out + s.bytes_in) / 1e3
            grad = f", gradient RMS {s.grad_rms:.2g}" if s.grad_rms else ""  # what --grad-clip compares with
            bar.set_postfix_str(f"loss {s.loss:.3f}, {tokens / (s.ms / 1e3):,.0f} tok/s, {kb:,.0f} kB/step{grad}")
        elif ev.kind == "eval":
            bar.write(f"step {ev.step}: held-out loss {ev.eval_loss:.4f}, perplexity {ev.perplexity:.2f}", sys.stderr)
        elif ev.kind == "stopped":
            bar.close()
            print(f"stopped at step {ev.step}: saved {ev.path}; go on with --resume", file=sys.stderr)
            sys.exit(130)
        elif ev.kind == "done":
            bar.close()
            print(f"adapter saved in {ev.path} (PEFT format; training_log.json beside it)", file=sys.stderr)
