"""Command line of the full-model baseline: `generate` prints text or JSON; no subcommand starts the app."""

from __future__ import annotations

import argparse
import sys

from splitcore.cli import add_generate_args, add_model_args, env, main_guard, run_generate, setup_logging
from splitcore.engine import FullEngine
from splitcore.models import resolve_with_fallback
from splitcore.runtime import configure_threads, resolve_device, resolve_dtype


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m baseline", description="GPT-2 on one machine, unsplit.")
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    add_generate_args(g)
    s = sub.add_parser("serve", help="start the Gradio app (the default)")
    add_model_args(s)
    s.add_argument("--host", default=env("GPT2_UI_HOST", "0.0.0.0"))
    s.add_argument("--port", type=int, default=int(env("GPT2_FULL_PORT", "7861")))
    s.add_argument("--log-file", default=env("GPT2_FULL_LOG", "logs/gpt2_full.log"))
    return p


def load_engine(args: argparse.Namespace) -> FullEngine:
    configure_threads(args.threads)
    device = resolve_device(args.device)
    model = resolve_with_fallback(args.model, args.models_dir, args.fallback_random)
    return FullEngine(model, device, resolve_dtype(args.dtype, device), args.attn)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("generate", "serve", "-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.command == "generate":
            setup_logging(None, args.verbose)
            engine = load_engine(args)
            run_generate(engine, args, {"model": args.model, "random_weights": engine.model.is_random})
        else:
            setup_logging(args.log_file, args.verbose)
            from baseline.app import serve

            serve(load_engine(args), args)

    main_guard(body)
