"""Errors the trunk client raises: one type, with the gRPC status and a message a person can act on."""

from __future__ import annotations

import grpc

from splitcore.errors import RemoteError, RemoteUnavailable


class TrunkError(RemoteError):
    """A trunk call failed; `code` is the gRPC status code. A SplitError like every error the project raises on
    purpose, so that one `except SplitError` catches them all."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> str:
        return self.code.name


class TrunkUnavailable(TrunkError, RemoteUnavailable):
    """The trunk server cannot be reached (down, wrong address, firewall) or went away."""


def from_rpc_error(e: grpc.RpcError, target: str) -> TrunkError:
    """The one place a grpc.RpcError becomes a TrunkError."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    if code == grpc.StatusCode.CANCELLED:  # we never cancel a call we still read: the server ended it
        return TrunkUnavailable(
            f"trunk server at {target} closed the session ({details}): idle timeout, shutdown or restart", code
        )
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith("draining"):  # a replica shutting down
        return TrunkUnavailable(f"trunk server at {target} is {details}", code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return TrunkUnavailable(
            f"trunk server at {target} is unreachable ({code.name}: {details}); check that it is running "
            f"(scripts/run_server.sh) and that GPT2_TRUNK_SERVER / --server names the right host:port",
            code,
        )
    return TrunkError(f"trunk server at {target} refused the request ({code.name}): {details}", code)
