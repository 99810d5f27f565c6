"""Futures that work run on another thread settles on an event loop: no torch here (the gRPC fronts import what
uses them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Held(asyncio.Future):
    """The future of a piece of work queued from an event loop, which a cancel of its awaiter does not cancel: the
    task stays until the work has run (a session's slot or state may be given back only then) and gets its
    CancelledError then (asyncio's Task.cancel, when the future it awaits refuses to be cancelled). `settled` does
    the same for any future with asyncio.shield, at two more callbacks and one more pass of the loop a step."""

    def cancel(self, msg: Any = None) -> bool:
        return False


async def settled(fut: asyncio.Future) -> Any:
    """Await `fut` to the end even if the awaiting task is cancelled meanwhile (then re-raise the cancel): a
    session's work in flight must finish before its slot or state is given back."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                pass
        raise


class Then:
    """In place of the future of a piece of work queued from an event loop: calls `fn` on that loop once the work
    has run, with no task to wake (`_settle` calls set_result)."""

    __slots__ = ("_loop", "_fn", "_done")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], None]):
        self._loop, self._fn, self._done = loop, fn, False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._done

    def set_result(self, _: Any) -> None:
        self._done = True
        try:
            self._fn()
        except Exception:  # the other waiters of the batch must still be told
            logger.exception("a step's answer failed")
