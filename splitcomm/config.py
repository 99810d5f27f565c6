"""How a client reaches a trunk server: settings only (no gRPC, no torch), so that command lines parse at once."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the stateless trunk KV of GPT-2 small at 1024 tokens is 50 MB


@dataclass
class TrunkClientConfig:
    """How to reach a trunk server and how long to wait for it."""

    target: str = "localhost:50051"  # host:port, a list of them, or a gRPC target URI (GPT2_TRUNK_SERVER)
    connect_timeout_s: float = 5.0  # to reach the server at all, s
    step_timeout_s: float = 60.0  # one step or stateless call, s (0 = no limit)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_ca: str | None = None  # CA bundle that signed the server's certificate: enables TLS
    tls_cert: str | None = None  # client certificate, for mutual TLS
    tls_key: str | None = None
    tls_server_name: str | None = None  # override the name checked in the server's certificate
    token: str | None = None  # shared secret sent as call metadata
