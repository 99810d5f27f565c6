"""Command line of the full-model baseline: `generate` prints text or JSON, `api` serves the OpenAI-compatible API;
no subcommand starts the app."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from frontend.cli import (
    add_api_parser,
    add_model_args,
    app_login,
    app_parser,
    main_guard,
    parse_app_args,
    run_generate,
)
from splitcore.logs import setup_logging

if TYPE_CHECKING:  # nothing heavy before the flags parse: `--help` answers at once
    from splitcore.engine import FullEngine


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "python -m baseline",
        "GPT-2 on one machine, unsplit.",
        add_model_args,
        "GPT2_FULL_PORT",
        7861,
        "GPT2_FULL_LOG",
        "logs/gpt2_full.log",
        lambda sub: add_api_parser(
            sub,
            add_model_args,
            "The OpenAI-compatible HTTP API over the full model, unsplit: the same API as `python -m client api`, "
            "so that one harness run against each compares split and full.",
        ),
    )


def load_engine(args: argparse.Namespace) -> FullEngine:
    from splitcore.device import configure_threads, resolve_device, resolve_dtype, use_cuda_graphs
    from splitcore.engine import FullEngine
    from splitcore.models import resolve_with_fallback

    configure_threads(args.threads)
    device = resolve_device(args.device)
    model = resolve_with_fallback(args.model, args.models_dir, args.fallback_random)
    graphs = use_cuda_graphs(args.cuda_graphs, device)
    dtype = resolve_dtype(args.dtype, device)
    return FullEngine(model, device, dtype, args.attn, graphs, args.adapter, args.compress)


def main(argv: list[str] | None = None) -> None:
    args = parse_app_args(build_parser(), argv)

    def body() -> None:
        if args.command == "generate":
            setup_logging(None, args.verbose)
            engine = load_engine(args)
            run_generate(engine, args, {"model": args.model, "random_weights": engine.model.is_random})
        elif args.command == "api":
            setup_logging(args.log_file, args.verbose)
            from frontend.api import serve as serve_api

            serve_api(load_engine(args), args)
        else:
            login = app_login(args)  # an open door is refused before anything loads
            setup_logging(args.log_file, args.verbose)
            from baseline.app import serve

            serve(load_engine(args), args, login)

    main_guard(body)
