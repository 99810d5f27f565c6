"""The one place where the trunk server's exceptions become gRPC status codes, and the fingerprint check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from server.sessions import ServerDraining
from splitcore.errors import InvalidInput, LimitExceeded, Mismatch, SplitError
from splitcore.fingerprint import Fingerprint

logger = logging.getLogger(__name__)

CLOSED_BY_SERVER = "closed by the server"
DRAINING = "draining"  # a reason that starts so ends the call with UNAVAILABLE: the client replays elsewhere


def peer(context) -> str:
    """The client's address, as gRPC saw it (a proxy's, for a call that came through one)."""
    return context.peer()


def closer() -> Callable[[str], None]:
    """What ends the current call from another thread (the idle reaper), saying why: cancels the call's task on
    its event loop, and `status_on_error` sends CANCELLED with the reason."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    return lambda reason: loop.call_soon_threadsafe(task.cancel, f"{CLOSED_BY_SERVER}: {reason}")


_STATUS = [
    (Mismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerDraining, grpc.StatusCode.UNAVAILABLE),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),  # CodecError too
]


@contextlib.asynccontextmanager
async def status_on_error(context: grpc.aio.ServicerContext, what: str, count: Callable[[str], None] | None = None):
    """The one place exceptions become gRPC status codes; unexpected ones are logged with a traceback. `count`
    is told each status code sent (the metrics' errors by code)."""
    try:
        yield
    except asyncio.CancelledError as e:  # the client cancelled or disconnected, or the server closed the call
        logger.debug("%s from %s cancelled", what, peer(context))
        if count is not None:
            count("CANCELLED")
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else ""
        if reason.startswith(CLOSED_BY_SERVER):  # tell the client why (a cancel alone sends nothing)
            reason = reason.removeprefix(f"{CLOSED_BY_SERVER}: ")
            if reason.startswith(DRAINING):
                await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
            await context.abort(grpc.StatusCode.CANCELLED, f"{CLOSED_BY_SERVER}: {reason}")
        raise
    except grpc.aio.AbortError:  # a status already sent
        raise
    except SplitError as e:
        code = next((c for t, c in _STATUS if isinstance(e, t)), grpc.StatusCode.INVALID_ARGUMENT)
        logger.info("%s from %s rejected: %s %s", what, peer(context), code.name, e)
        if count is not None:
            count(code.name)
        await context.abort(code, str(e))
    except Exception as e:
        logger.exception("%s from %s failed", what, peer(context))
        if count is not None:
            count("INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the trunk server: {type(e).__name__}: {e}")


def check_fingerprint(ours: Fingerprint, theirs, replica: str = "") -> None:
    """Refuse a client whose model differs, saying how (and, in a replica set, which replica refused); `theirs`:
    the Fingerprint message the client sent (read, never built, here)."""
    if not theirs.digest:
        raise InvalidInput("no model fingerprint sent: the first message must carry the client's fingerprint")
    if theirs.digest == ours.digest:
        return
    other = Fingerprint(
        theirs.arch, theirs.split, theirs.weights, theirs.n_layer, theirs.n_embd, theirs.adapter, theirs.compression
    )
    diffs = ours.differences(other) or ["fingerprint digest"]
    where = f" (replica {replica})" if replica else ""
    raise Mismatch(
        f"client and server{where} models differ in {'; '.join(diffs)} (server vs client); start both "
        f"with the same --model and --split, and the client's --trunk-compress as the server's --compress"
    )
