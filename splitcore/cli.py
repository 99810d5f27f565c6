"""Command-line pieces shared by `python -m client` and `python -m baseline`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from splitcore.engine import Engine
from splitcore.errors import SplitError
from splitcore.sampling import SamplingParams
from splitcore.settings import GenerateConfig, dataclass_flags


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of a process that generates with a model it holds (the baseline; the client adds its own)."""
    dataclass_flags(p, GenerateConfig)


def app_parser(
    prog: str,
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    port_env: str,
    default_port: int,
    log_env: str,
    default_log: str,
    more: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """`generate` (text or JSON on stdout) and `serve` (the Gradio app), both with the model options of `add_args`;
    `more` adds further subcommands."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    sub = p.add_subparsers(dest="command")
    if more is not None:
        more(sub)
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_args(g)
    add_generate_args(g)
    s = sub.add_parser("serve", help="start the Gradio app (the default)")
    add_args(s)
    s.add_argument("--host", default=env("GPT2_UI_HOST", "0.0.0.0"))
    s.add_argument("--port", type=int, default=int(env(port_env, str(default_port))))
    s.add_argument("--log-file", default=env(log_env, default_log))
    add_speculate_arg(s, "the Speculative decoding switch's setting at start (draft:SPEC adds that model to it): ")
    return p


def add_api_parser(sub, add_model: Callable[[argparse.ArgumentParser], None], description: str) -> None:
    """The `api` subcommand of a process's command line: its model flags (`add_model`) and the server's."""
    a = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible API (completions, chat completions) on this machine",
        description=description,
    )
    add_model(a)
    a.add_argument("--host", default=env("GPT2_API_HOST", "127.0.0.1"), help="address to listen on")
    a.add_argument("--port", type=int, default=int(env("GPT2_API_PORT", "8000")), help="(env GPT2_API_PORT)")
    a.add_argument(
        "--api-key",
        default=env("GPT2_API_KEY", "") or None,
        help="require 'Authorization: Bearer KEY' on every /v1 request (env GPT2_API_KEY)",
    )
    a.add_argument("--log-file", default=env("GPT2_API_LOG", "logs/gpt2_api.log"))


def parse_app_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """No subcommand (nothing, or options only) means `serve`."""
    argv = sys.argv[1:] if argv is None else argv
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=50, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, 1 = off (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_speculate_arg(p)


def add_speculate_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument(
        "--speculate",
        default="none",
        metavar="none|lookup|self|draft:SPEC",
        help=f"{what}draft tokens on this machine and verify several per trunk round trip: lookup (from the "
        "context), self (the split client's own blocks) or draft:SPEC (a model of the same vocabulary, e.g. from "
        "python -m client distill); greedy gives the same tokens as without, sampling the same distribution "
        "(default %(default)s)",
    )


Report = Callable[[list[int]], tuple[str, dict, str]]  # prompt ids -> (JSON key, JSON value, line for stderr)


def run_generate(
    engine: Engine, args: argparse.Namespace, extra: dict | None = None, tap=None, report: Report | None = None
) -> None:
    """Generate for the CLI: stream text to stdout, or print one JSON object with --json. `tap` hears what
    crosses to the trunk; `report`, called once the generation is done, adds to the JSON (or a line on stderr)."""
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if args.json:
        result = engine.run(args.prompt, args.max_tokens, params, args.speculate, tap=tap)
        more = dict(extra or {})
        if report is not None:
            key, value, _ = report(result.prompt_token_ids)
            more[key] = value
        print(json.dumps(result.to_json(**more)))
        return
    ids = engine.encode(args.prompt)
    events = engine.stream(ids, args.max_tokens, params, speculate=args.speculate, tap=tap)
    first = next(events, None)  # a request that cannot run fails here, before the prompt is echoed
    sys.stdout.write(args.prompt)
    for event in [first, *events] if first is not None else []:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if report is not None:
        print(report(ids)[2], file=sys.stderr)


def main_guard(fn: Callable[[], None], extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run a CLI body; a user mistake becomes one 'error: ...' line and exit code 2, not a traceback."""
    try:
        fn()
    except (SplitError, *extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
