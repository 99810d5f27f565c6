"""The one place where the trunk server's exceptions become gRPC status codes, and the fingerprint check."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import grpc

from server.sessions import ServerDraining
from splitcomm import codec
from splitcomm.proto import trunk_pb2 as pb
from splitcore.errors import InvalidInput, LimitExceeded, Mismatch, SplitError
from splitcore.fingerprint import Fingerprint

logger = logging.getLogger(__name__)

_STATUS = [
    (Mismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerDraining, grpc.StatusCode.UNAVAILABLE),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (codec.CodecError, grpc.StatusCode.INVALID_ARGUMENT),
]


@contextlib.contextmanager
def status_on_error(context: grpc.ServicerContext, what: str, count: Callable[[str], None] | None = None):
    """The one place exceptions become gRPC status codes; unexpected ones are logged with a traceback. `count`
    is told each status code sent (the metrics' errors by code)."""
    try:
        yield
    except grpc.RpcError:  # the client cancelled or disconnected: the stream just ends
        logger.debug("%s from %s ended by the client", what, context.peer())
        if count is not None:
            count("CANCELLED")
    except (SplitError, codec.CodecError) as e:
        code = next(c for t, c in _STATUS if isinstance(e, t))
        logger.info("%s from %s rejected: %s %s", what, context.peer(), code.name, e)
        if count is not None:
            count(code.name)
        context.abort(code, str(e))
    except Exception as e:
        logger.exception("%s from %s failed", what, context.peer())
        if count is not None:
            count("INTERNAL")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in the trunk server: {type(e).__name__}: {e}")


def check_fingerprint(ours: Fingerprint, theirs: pb.Fingerprint) -> None:
    if not theirs.digest:
        raise InvalidInput("no model fingerprint sent: the first message must carry the client's fingerprint")
    if theirs.digest == ours.digest:
        return
    other = Fingerprint(theirs.arch, theirs.split, theirs.weights, theirs.n_layer, theirs.n_embd, theirs.adapter)
    diffs = ours.differences(other) or ["fingerprint digest"]
    raise Mismatch(
        f"client and server models differ in {'; '.join(diffs)} (server vs client); start both "
        f"with the same --model and --split"
    )
