"""Settings of the trunk server: one dataclass whose fields declare their own flags and environment variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from splitcomm.config import DEFAULT_MAX_MESSAGE_BYTES
from splitcore.settings import DEFAULT_SPLIT, ModelConfig, dataclass_flags, setting


@dataclass
class ServerConfig(ModelConfig):
    # GPT2_DTYPE as every process; GPT2_SERVER_DTYPE, the older name, still wins on the server
    dtype: str = setting(
        "auto",
        ("GPT2_SERVER_DTYPE", "GPT2_DTYPE"),
        "auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16",
    )
    split: str = setting(DEFAULT_SPLIT, "GPT2_SPLIT", "s1,s2: the trunk runs blocks [s1, s2)")
    host: str = setting("0.0.0.0", "GPT2_SERVER_HOST", "interface to bind")
    port: int = setting(50051, "GPT2_SERVER_PORT", "0 = any free port (printed on the ready line)")
    max_sessions: int = setting(32, "GPT2_MAX_SESSIONS", "concurrent sessions")
    max_session_tokens: int = setting(0, "GPT2_MAX_SESSION_TOKENS", "tokens per session; 0 = the model's context")
    kv_slots: int = setting(16, "GPT2_KV_SLOTS", "KV cache rows allocated at start, one per inference session")
    kv_memory_mb: float = setting(0.0, "GPT2_KV_MEMORY_MB", "instead: as many slots as fit in this many MiB (0 = off)")
    max_batch: int = setting(32, "GPT2_MAX_BATCH", "decode steps in one forward, at most (1 = no batching)")
    batch_wait_ms: float = setting(
        5.0,
        "GPT2_BATCH_WAIT_MS",
        "a decode batch's wait for the other decoding sessions (and at most a step's time), ms",
    )
    prefill_chunk: int = setting(
        128, "GPT2_PREFILL_CHUNK", "prompt positions computed at a time, decode batches running between chunks"
    )
    event_loop: str = setting(
        "auto",
        "GPT2_EVENT_LOOP",
        "the loop gRPC runs on: auto is uvloop where installed",
        choices=["auto", "uvloop", "asyncio"],
    )
    switch_interval_ms: float = setting(
        0.1,
        "GPT2_SWITCH_INTERVAL_MS",
        "how long a thread may hold the interpreter while another waits for it, ms (0 = Python's 5): the "
        "scheduler, woken for a batch, waits this long at most for the busy event loop",
    )
    metrics_port: int = setting(0, "GPT2_METRICS_PORT", "Prometheus /metrics on this port (0 = off)")
    metrics_host: str = setting("0.0.0.0", "GPT2_METRICS_HOST", "interface of the metrics endpoint")
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES, "GPT2_MAX_MESSAGE_BYTES", "largest message either way, bytes"
    )
    idle_timeout_s: float = setting(
        300.0, "GPT2_IDLE_TIMEOUT", "a silent session is closed after this long, s (0 = never)", flag="--idle-timeout"
    )
    train_recompute: bool = setting(
        False,
        "GPT2_TRAIN_RECOMPUTE",
        "training sessions keep no activations between forward and backward: the forward runs again (less "
        "memory, one more forward per step)",
    )
    max_monitors: int = setting(16, None, "concurrent monitor streams")
    monitor_interval_s: float = setting(1.0, None, "default time between monitor samples, s", flag="--monitor-interval")
    grace_s: float = setting(
        10.0,
        "GPT2_GRACE",
        "on SIGTERM or Ctrl-C the server drains: open sessions get this long to finish, then are ended so that "
        "their clients replay them on another replica, s (a second signal: stop at once)",
        flag="--grace",
    )
    log_file: str = setting("logs/gpt2_server.log", "GPT2_SERVER_LOG", "the server's log")
    tls_cert: str | None = setting(None, "GPT2_TLS_CERT", "server certificate (PEM): enables TLS")
    tls_key: str | None = setting(None, "GPT2_TLS_KEY", "its private key (PEM)")
    tls_client_ca: str | None = setting(None, "GPT2_TLS_CLIENT_CA", "CA of client certificates: enables mutual TLS")
    auth_token: str | None = setting(None, "GPT2_AUTH_TOKEN", "shared secret clients must send as call metadata")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="GPT-2 trunk server (split inference).")
    dataclass_flags(p, ServerConfig)
    return p


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    return ServerConfig(**vars(build_parser().parse_args(argv)))
