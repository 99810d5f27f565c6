"""Settings of the trunk server: one dataclass, filled from flags whose defaults come from the environment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from splitcomm.channel import DEFAULT_MAX_MESSAGE_BYTES
from splitcore.cli import env


@dataclass
class ServerConfig:
    model: str = "gpt2"  # model spec (hub id, directory, random:NAME)
    models_dir: str = "models"  # downloads and random presets
    fallback_random: bool = False  # default gpt2 unavailable -> random:gpt2, loudly
    split: str = "2,10"  # trunk runs blocks [s1, s2)
    host: str = "0.0.0.0"  # interface to bind
    port: int = 50051  # 0 = any free port (printed on the ready line)
    device: str = "auto"  # auto, cpu, cuda[:N]
    dtype: str = "auto"  # auto = float16 on GPU, float32 on CPU
    attn: str = "sdpa"  # sdpa or eager
    cuda_graphs: str = "on"  # on: decode steps as CUDA graphs on a GPU; off: eager (no effect on the CPU)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    max_sessions: int = 32  # concurrent sessions
    max_session_tokens: int = 0  # tokens per session; 0 = the model's context
    kv_slots: int = 16  # KV cache rows allocated at start, one per open inference session
    kv_memory_mb: float = 0.0  # or: as many slots as fit in this many MiB (0 = use kv_slots)
    max_batch: int = 32  # decode steps of different sessions in one forward, at most
    batch_wait_ms: float = 5.0  # a decode batch waits at most this long (and one step's time) for the others, ms
    prefill_chunk: int = 128  # prompt positions computed at a time, decode batches running between chunks
    event_loop: str = "auto"  # the gRPC side's asyncio loop: auto (uvloop where installed), uvloop, asyncio
    pipeline_depth: int = 1  # batches in flight at once: 2 = two cohorts of sessions out of phase (for a GPU)
    metrics_port: int = 0  # Prometheus /metrics on this port (0 = off)
    metrics_host: str = "0.0.0.0"  # interface of the metrics endpoint
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest message either way, bytes
    idle_timeout_s: float = 300.0  # a silent session is closed after this long, s (0 = never)
    train_recompute: bool = False  # training sessions keep only the input and run the forward again at backward
    max_monitors: int = 16  # concurrent monitor streams
    monitor_interval_s: float = 1.0  # default time between monitor samples, s
    grace_s: float = 10.0  # on shutdown, in-flight work gets this long, s
    log_file: str = "logs/gpt2_server.log"
    tls_cert: str | None = None  # server certificate (PEM): enables TLS
    tls_key: str | None = None  # its private key (PEM)
    tls_client_ca: str | None = None  # CA for client certificates: enables mutual TLS
    auth_token: str | None = None  # shared secret clients must send as call metadata
    verbose: bool = False


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m server", description="GPT-2 trunk server (split inference).")

    def number(flag: str, env_name: str, default: int | float, text: str, **kw) -> None:
        """A numeric flag whose default comes from `env_name` (a bad value there is one readable line)."""
        kind, raw = type(default), env(env_name, "")
        try:
            value = kind(raw) if raw else default
        except ValueError:
            p.error(f"{env_name}={raw!r} is not a{'n integer' if kind is int else ' number'}")
        p.add_argument(flag, type=kind, default=value, help=f"{text} (env {env_name}; default %(default)s)", **kw)

    p.add_argument("--model", default=env("GPT2_MODEL", d.model), help="hub id, directory or random:NAME")
    p.add_argument("--models-dir", default=env("GPT2_MODELS_DIR", d.models_dir))
    p.add_argument("--fallback-random", action="store_true", default=env("GPT2_FALLBACK_RANDOM", "0") == "1")
    p.add_argument("--split", default=env("GPT2_SPLIT", d.split), help="s1,s2: trunk runs blocks [s1, s2)")
    p.add_argument("--host", default=env("GPT2_SERVER_HOST", d.host))
    number("--port", "GPT2_SERVER_PORT", d.port, "0 = any free port (printed on the ready line)")
    p.add_argument("--device", default=env("GPT2_DEVICE", d.device))
    p.add_argument(  # GPT2_DTYPE as every process; GPT2_SERVER_DTYPE, the older name, still wins on the server
        "--dtype", default=env("GPT2_SERVER_DTYPE", env("GPT2_DTYPE", d.dtype)), help="auto, float32, float16, bfloat16"
    )
    p.add_argument("--attn", default=env("GPT2_ATTN", d.attn), choices=["sdpa", "eager"])
    p.add_argument(
        "--cuda-graphs",
        default=env("GPT2_CUDA_GRAPHS", d.cuda_graphs),
        choices=["on", "off"],
        help="decode steps as CUDA graphs on a GPU (env GPT2_CUDA_GRAPHS; no effect on the CPU)",
    )
    p.add_argument("--threads", type=int, default=int(env("GPT2_THREADS", "0")) or None)
    number("--max-sessions", "GPT2_MAX_SESSIONS", d.max_sessions, "concurrent sessions")
    number("--max-session-tokens", "GPT2_MAX_SESSION_TOKENS", d.max_session_tokens, "0 = the model's context")
    number("--kv-slots", "GPT2_KV_SLOTS", d.kv_slots, "KV cache rows allocated at start, one per inference session")
    number("--kv-memory-mb", "GPT2_KV_MEMORY_MB", d.kv_memory_mb, "instead: as many slots as fit in this many MiB")
    number("--max-batch", "GPT2_MAX_BATCH", d.max_batch, "decode steps in one forward, at most (1 = no batching)")
    number("--batch-wait-ms", "GPT2_BATCH_WAIT_MS", d.batch_wait_ms, "a decode batch's wait for the others, ms")
    number("--prefill-chunk", "GPT2_PREFILL_CHUNK", d.prefill_chunk, "prompt positions computed at a time")
    number(
        "--pipeline-depth",
        "GPT2_PIPELINE_DEPTH",
        d.pipeline_depth,
        "decode batches in flight: 2 splits the sessions into two cohorts out of phase, whose network legs "
        "overlap each other's forward (for a GPU, where a half batch costs what a whole one does)",
    )
    p.add_argument(
        "--event-loop",
        default=env("GPT2_EVENT_LOOP", d.event_loop),
        choices=["auto", "uvloop", "asyncio"],
        help="the loop gRPC runs on: auto is uvloop where installed (env GPT2_EVENT_LOOP; default %(default)s)",
    )
    number("--metrics-port", "GPT2_METRICS_PORT", d.metrics_port, "Prometheus /metrics on this port (0 = off)")
    p.add_argument("--metrics-host", default=env("GPT2_METRICS_HOST", d.metrics_host))
    number("--max-message-bytes", "GPT2_MAX_MESSAGE_BYTES", d.max_message_bytes, "largest message either way")
    number("--idle-timeout", "GPT2_IDLE_TIMEOUT", d.idle_timeout_s, "s; 0 = never", dest="idle_timeout_s")
    p.add_argument(
        "--train-recompute",
        action="store_true",
        default=env("GPT2_TRAIN_RECOMPUTE", "0") == "1",
        help="training sessions keep no activations between forward and backward: the forward runs again "
        "(less memory, one more forward per step)",
    )
    p.add_argument("--monitor-interval", dest="monitor_interval_s", type=float, default=d.monitor_interval_s)
    p.add_argument("--log-file", default=env("GPT2_SERVER_LOG", d.log_file))
    p.add_argument("--tls-cert", default=env("GPT2_TLS_CERT", "") or None)
    p.add_argument("--tls-key", default=env("GPT2_TLS_KEY", "") or None)
    p.add_argument("--tls-client-ca", default=env("GPT2_TLS_CLIENT_CA", "") or None)
    p.add_argument(
        "--auth-token",
        default=env("GPT2_AUTH_TOKEN", "") or None,
        help="shared secret clients must send (env GPT2_AUTH_TOKEN)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    ns = build_parser().parse_args(argv)
    names = {f.name for f in fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in vars(ns).items() if k in names})
