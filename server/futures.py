"""Futures that work run on another thread settles on an event loop."""

from __future__ import annotations

import asyncio
import logging
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
