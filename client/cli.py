"""Command line of the split client: `generate` prints text or JSON; no subcommand starts the Gradio app."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from client.engine import ClientConfig, SplitEngine
from splitcomm.errors import TrunkError
from splitcore.cli import add_generate_args, add_model_args, env, main_guard, run_generate, setup_logging
from splitcore.runtime import configure_threads


def add_split_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--split", default=env("GPT2_SPLIT", "2,10"), help="s1,s2 (must match the server's)")
    p.add_argument(
        "--server",
        default=env("GPT2_TRUNK_SERVER", "localhost:50051"),
        help="trunk server host:port (env GPT2_TRUNK_SERVER; default %(default)s)",
    )
    p.add_argument("--local-trunk", action="store_true", help="run the trunk in this process (no server)")
    p.add_argument(
        "--stateless",
        action="store_true",
        help="send the trunk KV cache with every call instead of keeping it on the server",
    )
    p.add_argument(
        "--wire-dtype",
        default=env("GPT2_WIRE_DTYPE", "float32"),
        choices=["float32", "float16", "bfloat16"],
        help="dtype of hidden states on the wire",
    )
    p.add_argument("--connect-timeout", dest="connect_timeout_s", type=float, default=5.0)
    p.add_argument("--step-timeout", dest="step_timeout_s", type=float, default=60.0)
    p.add_argument(
        "--reconnect",
        dest="reconnect_s",
        type=float,
        default=float(env("GPT2_RECONNECT_S", "30")),
        help="if the trunk goes away mid-generation, keep retrying this long, s (0 = don't)",
    )
    p.add_argument("--tls-ca", default=env("GPT2_TLS_CA", "") or None, help="CA of the server's certificate")
    p.add_argument("--tls-cert", default=env("GPT2_TLS_CLIENT_CERT", "") or None, help="client cert (mTLS)")
    p.add_argument("--tls-key", default=env("GPT2_TLS_CLIENT_KEY", "") or None, help="client key (mTLS)")
    p.add_argument("--tls-server-name", default=None, help="name to check in the server's certificate")
    p.add_argument("--auth-token", default=env("GPT2_AUTH_TOKEN", "") or None)
    p.add_argument(
        "--added-delay-ms", type=float, default=0.0, help="sleep this long each way per trunk call (simulated WAN)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m client", description="GPT-2 split client: embeddings and head here, trunk on a server."
    )
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_split_args(g)
    add_generate_args(g)
    s = sub.add_parser("serve", help="start the Gradio app (the default)")
    add_split_args(s)
    s.add_argument("--host", default=env("GPT2_UI_HOST", "0.0.0.0"))
    s.add_argument("--port", type=int, default=int(env("GPT2_CLIENT_PORT", "7860")))
    s.add_argument("--log-file", default=env("GPT2_CLIENT_LOG", "logs/gpt2_client.log"))
    return p


def client_config(args: argparse.Namespace) -> ClientConfig:
    names = {f.name for f in fields(ClientConfig)}
    return ClientConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("generate", "serve", "-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.command == "generate":
            setup_logging(None, args.verbose)
            configure_threads(args.threads)
            engine = SplitEngine(client_config(args))
            if not args.local_trunk:
                engine.check_server()
            extra = {
                "model": engine.model.spec,
                "random_weights": engine.model.is_random,
                "split": str(engine.split),
                "trunk": engine.trunk_label,
            }
            try:
                run_generate(engine, args, extra)
            finally:
                engine.close()
        else:
            setup_logging(args.log_file, args.verbose)
            configure_threads(args.threads)
            from client.app import serve

            serve(SplitEngine(client_config(args)), args)

    main_guard(body, (TrunkError,))
