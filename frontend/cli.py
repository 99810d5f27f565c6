"""Command-line pieces shared by `python -m client` and `python -m baseline`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from typing import TYPE_CHECKING

from splitcore.errors import InvalidInput, SplitError
from splitcore.settings import GenerateConfig, dataclass_flags, is_loopback, setting

if TYPE_CHECKING:  # the parsers build without torch: `--help` answers at once
    from splitcore.engine import Engine

logger = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of a process that generates with a model it holds (the baseline; the client adds its own)."""
    dataclass_flags(p, GenerateConfig)


SPECULATE_HELP = (
    "draft tokens on this machine and verify several per trunk round trip: lookup (from the context), self (the "
    "split client's own blocks) or draft:SPEC (a model of the same vocabulary, e.g. from python -m client distill); "
    "greedy gives the same tokens as without, sampling the same distribution"
)


@dataclass
class GenerateArgs:
    """`generate`: one prompt, on stdout."""

    prompt: str = setting("", None, "text to continue")
    max_tokens: int = 50  # tokens to generate
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling, 1 = off
    seed: int | None = None  # seed for reproducible sampling
    json: bool = False  # print one JSON object instead of streaming text
    speculate: str = setting("none", None, SPECULATE_HELP + " (none|lookup|self|draft:SPEC)")


def app_settings(port_env: str, default_port: int, log_env: str, default_log: str) -> type:
    """The settings of an app's `serve`: where it listens and logs (each app its own port and log variables)."""
    return make_dataclass(
        "AppSettings",
        [
            ("host", str, setting("127.0.0.1", "GPT2_UI_HOST", "interface the app listens on (beyond loopback it "
             "needs --auth or --no-auth)")),
            ("port", int, setting(default_port, port_env, "the app's port")),
            ("log_file", str, setting(default_log, log_env, "the app's log")),
            ("auth", str | None, setting(None, "GPT2_UI_AUTH", "USER:PASS: a login for the app (Gradio's own)")),
            ("no_auth", bool, setting(False, None, "serve beyond loopback with no login, on purpose (a warning)")),
            ("speculate", str, setting("none", None, "the Speculative decoding switch's setting at start (draft:SPEC "
             "adds that model to it): " + SPECULATE_HELP)),
        ],
    )  # fmt: skip


@dataclass
class ApiSettings:
    """`api`: where the OpenAI-compatible API listens, its key and its log."""

    host: str = setting("127.0.0.1", "GPT2_API_HOST", "address to listen on")
    port: int = setting(8000, "GPT2_API_PORT", "port to listen on")
    api_key: str | None = setting(None, "GPT2_API_KEY", "require 'Authorization: Bearer KEY' on every /v1 request")
    log_file: str = setting("logs/gpt2_api.log", "GPT2_API_LOG", "the API's log")


def app_parser(
    prog: str,
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    port_env: str,
    default_port: int,
    log_env: str,
    default_log: str,
    more: Callable[[argparse._SubParsersAction], None] | None = None,
    serve_settings: type | None = None,
) -> argparse.ArgumentParser:
    """`generate` (text or JSON on stdout) and `serve` (the Gradio app), both with the model options of `add_args`;
    `more` adds further subcommands, `serve_settings` (a settings dataclass) flags of this app's `serve` alone."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    sub = p.add_subparsers(dest="command")
    if more is not None:
        more(sub)
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_args(g)
    dataclass_flags(g, GenerateArgs, positional=("prompt",))
    s = sub.add_parser("serve", help="start the Gradio app (the default)")
    add_args(s)
    dataclass_flags(s, app_settings(port_env, default_port, log_env, default_log))
    if serve_settings is not None:
        dataclass_flags(s, serve_settings)
    return p


def app_login(args: argparse.Namespace) -> tuple[str, str] | None:
    """The login an app's `serve` asks for (--auth USER:PASS), or None; an app that would listen beyond loopback
    with no login is refused in one line unless --no-auth says so on purpose (then a warning)."""
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise InvalidInput("--auth: give USER:PASS (or set GPT2_UI_AUTH)")
        return user, password
    if not is_loopback(args.host):
        if not args.no_auth:
            raise InvalidInput(
                f"the app would listen on {args.host} with no login: anyone who reaches it could generate and "
                "fine-tune; give --auth USER:PASS (or GPT2_UI_AUTH), or --no-auth to serve it open on purpose"
            )
        logger.warning("the app listens on %s with no login (--no-auth): anyone who reaches it can use it", args.host)
    return None


def add_api_parser(sub, add_model: Callable[[argparse.ArgumentParser], None], description: str) -> None:
    """The `api` subcommand of a process's command line: its model flags (`add_model`) and the server's."""
    a = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible API (completions, chat completions) on this machine",
        description=description,
    )
    add_model(a)
    dataclass_flags(a, ApiSettings)


def parse_app_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """No subcommand (nothing, or options only) means `serve`."""
    argv = sys.argv[1:] if argv is None else argv
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


Report = Callable[[list[int]], tuple[str, dict, str]]  # prompt ids -> (JSON key, JSON value, line for stderr)


def run_generate(
    engine: Engine, args: argparse.Namespace, extra: dict | None = None, tap=None, report: Report | None = None
) -> None:
    """Generate for the CLI: stream text to stdout, or print one JSON object with --json. `tap` hears what
    crosses to the trunk; `report`, called once the generation is done, adds to the JSON (or a line on stderr)."""
    from splitcore.sampling import SamplingParams

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
