"""Command line of the split client: `generate` prints text or JSON; no subcommand starts the Gradio app."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from client.config import ClientConfig, TrainConfig
from frontend.cli import (
    add_api_parser,
    app_login,
    app_parser,
    main_guard,
    parse_app_args,
    run_generate,
)
from splitcore.errors import InvalidInput
from splitcore.logs import setup_logging
from splitcore.settings import DistillConfig, ProcessConfig, dataclass_flags, setting

if TYPE_CHECKING:  # nothing heavy before the flags parse: `--help` and a bad flag answer at once
    from client.split_engine import SplitEngine


TRAIN_LOGS = {"train": "logs/gpt2_train.log", "federate": "logs/gpt2_federate.log"}


@dataclass
class TrainWhere:
    """Where `train` runs its trunk."""

    local: bool = False  # everything in this process, no server: the reference


@dataclass
class PrivacyReportArgs:
    """`privacy-report`: the private text and how much of it is scored."""

    private_data: str = setting("", None, "the text to score: a file, a directory or bible:PASSAGES (required)")
    windows: int = 32  # private windows of 64 tokens scored
    prompts: int = 20  # prompts for greedy agreement
    json: bool = False  # print the rows as JSON


@dataclass
class DenoiserArgs:
    """`train-denoiser`: the public text, where the denoiser goes, and how long it trains."""

    data: str = setting("", None, "public text: a file, a directory or bible:PASSAGES (required)")
    out: str = setting("", None, "where the denoiser is saved (required)")
    steps: int = 300  # training steps of 8 windows of 64 tokens


def add_split_args(p: argparse.ArgumentParser) -> None:
    """Every setting of the split client (ClientConfig's fields declare their flags)."""
    dataclass_flags(p, ClientConfig)


def add_train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        help="fine-tune a LoRA adapter across the split (the text stays here; the gradients sent reveal it)",
        description="Fine-tune GPT-2 across the split: the trunk server trains a LoRA adapter on its blocks from "
        "hidden states and gradients. Text and token ids never leave this machine, but the gradient sent back lets "
        "the trunk's operator solve for the labels (the text's next tokens): see docs/privacy.md. The adapter is "
        "saved in PEFT's format in --out.",
    )
    add_split_args(t)
    dataclass_flags(t, TrainConfig)
    dataclass_flags(t, TrainWhere)


def add_api_command(sub) -> None:
    add_api_parser(
        sub,
        add_split_args,
        "An OpenAI-compatible HTTP API over the split model: point the openai package, curl or lm-evaluation-harness "
        "at http://HOST:PORT/v1. Prompts stay on this machine; each prompt is a trunk session of its own.",
    )


def add_distill_command(sub) -> None:
    d = sub.add_parser(
        "distill",
        help="train a small draft model for speculative decoding (--speculate draft:DIR) from a teacher's soft labels",
        description="Distil a student of --n-layer blocks from --teacher on the text in --data: "
        "loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, the student initialised "
        "from every other teacher block; saved in Hugging Face format in --out.",
    )
    dataclass_flags(d, DistillConfig)
    dataclass_flags(d, ProcessConfig)


def add_privacy_command(sub) -> None:
    r = sub.add_parser(
        "privacy-report",
        help="what the trunk could read with these settings, and what the defence costs: a table, no UI",
        description="Train the attacks on public text (--attack-data) through this client's bottom and defence, "
        "score them on private text (--private-data) they never saw, and measure the defence's cost in "
        "perplexity, greedy agreement and decode time against the undefended split at the same cut. The trunk "
        "runs in this process.",
    )
    add_split_args(r)
    dataclass_flags(r, PrivacyReportArgs)


def add_denoiser_command(sub) -> None:
    d = sub.add_parser(
        "train-denoiser",
        help="train the client's denoiser for its defence from the trunk's answers on public text",
        description="Send public text to the trunk twice, clean and with this client's defence, and train a small "
        "model on this machine that repairs the noisy answer (Split-and-Denoise); then generate with "
        "--denoise OUT and the same defence. Only public text crosses clean.",
    )
    add_split_args(d)
    dataclass_flags(d, DenoiserArgs)


def add_commands(sub) -> None:
    from client.federate_cli import add_federate_command

    add_train_command(sub)
    add_federate_command(sub, add_split_args)
    add_privacy_command(sub)
    add_denoiser_command(sub)
    add_api_command(sub)
    add_distill_command(sub)


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "python -m client",
        "GPT-2 split client: embeddings and head here, trunk on a server.",
        add_split_args,
        "GPT2_CLIENT_PORT",
        7860,
        "GPT2_CLIENT_LOG",
        "logs/gpt2_client.log",
        add_commands,
        ClientAppSettings,
    )


@dataclass
class ClientAppSettings:
    """The split client app's own `serve` settings."""

    data_dir: str | None = setting(
        None,
        "GPT2_DATA_DIR",
        "the folder whose text files the Fine-tune tab may train on (besides uploads); none: uploads only",
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    names = {f.name for f in fields(ClientConfig)}
    return ClientConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_distill(args: argparse.Namespace) -> None:
    from splitcore.distill import distill, report_line

    names = {f.name for f in fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.check()
    every = max(1, cfg.steps // 20)

    def progress(step: int, m: dict) -> None:
        if step % every == 0 or step == cfg.steps:
            print(
                f"step {step}/{cfg.steps}: loss {m['loss']:.3f} (KL {m['kl']:.3f}, cross-entropy {m['ce']:.3f})",
                file=sys.stderr,
                flush=True,
            )

    distill(cfg, progress)
    print(f"saved {cfg.out}: {report_line(cfg.out)}; generate with --speculate draft:{cfg.out}")


def run_privacy_report(args: argparse.Namespace, cfg: ClientConfig) -> None:
    """The privacy table for these settings: the undefended split at this cut, then this defence."""
    import json

    from client.privacy import InverterConfig
    from client.privacy_eval import Setting, attack_floor, evaluate, load_texts, table

    if not cfg.attack_data:
        raise InvalidInput("privacy-report needs public text to train its attacker on: give --attack-data")
    if not args.private_data:
        raise InvalidInput("privacy-report needs the private text to score: give --private-data")
    from client.split_engine import SplitEngine

    engine = SplitEngine(replace(cfg, local_trunk=True))  # checks the settings before the text is read
    texts = load_texts(engine.encode, cfg.attack_data, args.private_data, args.windows, args.prompts)
    engine.close()
    ours = Setting(str(engine.split), cfg.defence, cfg.noise_scale, cfg.noise_clip, cfg.denoise)
    settings = [Setting(str(engine.split))] + ([ours] if ours != Setting(str(engine.split)) else [])
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    clean: dict = {}
    rows = [
        evaluate(cfg.model, cfg.models_dir, s, texts, InverterConfig(steps=cfg.attack_steps), 64, clean, say)
        for s in settings
    ]
    bottom = attack_floor(cfg.model, cfg.models_dir, texts, clean)
    print(json.dumps({"rows": rows, **bottom}, indent=1) if args.json else table(rows, bottom))


def run_train_denoiser(args: argparse.Namespace, cfg: ClientConfig) -> None:
    import torch
    from tqdm import tqdm

    from client.denoise import train_denoiser
    from client.privacy import public_text

    if not args.data or not args.out:
        raise InvalidInput("train-denoiser needs --data (public text) and --out (where the denoiser goes)")
    if args.steps < 1:
        raise InvalidInput(f"--steps must be at least 1, got {args.steps}")
    from client.split_engine import SplitEngine

    engine = SplitEngine(replace(cfg, denoise="none"))
    try:
        if engine.trunk_client is not None:
            engine.check_server()
        ids = torch.tensor(engine.encode(public_text(args.data)), dtype=torch.long)
        with tqdm(total=args.steps, desc="training the denoiser", unit="step") as bar:
            denoiser = train_denoiser(
                engine, ids, args.steps, progress=lambda s, n, loss: (bar.update(1), bar.set_postfix(kl=f"{loss:.4f}"))
            )
        denoiser.save(args.out)
    finally:
        engine.close()
    print(f"denoiser saved in {args.out}; generate with --defence {cfg.defence} --noise-scale {cfg.noise_scale:g} "
          f"--denoise {args.out}")  # fmt: skip


def metered(engine: SplitEngine):
    """A tap that records what the generation sends, and the report that reads the prompt back from it."""
    from client.privacy import prepare_meter
    from splitcore.engine import Recorder

    meter, recorder = prepare_meter(engine), Recorder()

    def report(prompt_ids: list[int], adapter: str | None = None):
        reading = meter.read(prompt_ids, recorder.prefill, adapter)
        line = (
            f"privacy meter: the trunk could read at least {sum(reading.hits)} of {len(prompt_ids)} prompt tokens "
            f"({reading.share:.0%}) from what was sent ({reading.attacker}): {engine.decode(reading.read_ids)!r}"
        )
        return "privacy", reading.to_json(engine.decode), line

    return recorder, report


def main(argv: list[str] | None = None) -> None:
    args = parse_app_args(build_parser(), argv)

    def body() -> None:
        from splitcore.device import configure_threads

        login = app_login(args) if args.command == "serve" else None  # an open door: refused before anything loads
        log_file = args.log_file if args.command in ("serve", "api") else None
        setup_logging(TRAIN_LOGS.get(args.command, log_file), args.verbose)
        configure_threads(args.threads)
        if args.command == "train":
            from client.train_cli import run_train

            run_train(args, client_config(args))
        elif args.command == "privacy-report":
            run_privacy_report(args, client_config(args))
        elif args.command == "train-denoiser":
            run_train_denoiser(args, client_config(args))
        elif args.command == "distill":
            run_distill(args)
        elif args.command == "federate":
            from client.federate_cli import run_federate

            run_federate(args)
        elif args.command in ("api", "generate"):
            _serve_engine(args)
        else:
            from client.app import serve
            from client.split_engine import SplitEngine

            serve(SplitEngine(client_config(args)), args, login)

    main_guard(body)


def _serve_engine(args) -> None:
    """`api` and `generate`: a split engine, checked against its server first."""
    from client.split_engine import SplitEngine

    engine = SplitEngine(client_config(args))
    if not args.local_trunk:
        engine.check_server()
    if args.command == "api":
        from frontend.api import serve as serve_api

        return serve_api(engine, args)
    extra = {
        "model": engine.model.spec,
        "random_weights": engine.model.is_random,
        "split": str(engine.split),
        "trunk": engine.trunk_label,
    }
    tap, report = metered(engine) if engine.cfg.privacy_meter else (None, None)
    try:
        run_generate(engine, args, extra, tap, report)
    finally:
        engine.close()
