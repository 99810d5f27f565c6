"""Live sessions of the trunk server: limits, counters, idle reaping, the end of a drain. A session's KV row and
state are freed by its own stream handler once the stream ends, so a reaper or a drain only marks it closed and
cancels its call, never pulling its state from under a step."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from server.monitor import Counters
from splitcore.errors import LimitExceeded, SplitError

logger = logging.getLogger(__name__)

SessionId = str


class ServerDraining(SplitError):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


@dataclass
class Session:
    id: SessionId
    peer: str
    max_length: int  # tokens this session may hold
    cancel: callable  # ends the RPC, given the reason (used by the idle reaper)
    slot: int | None = None  # its row of the runtime's KV pool (and its caches), taken at open, given back at its end
    model: object = None  # the trunk with this session's adapter (a twin sharing the base weights), or None
    rows: int | None = None  # rows a step carries, fixed by the first step
    closed: bool = False  # set by close(); the session's handler then ends the stream and frees the cache
    next_step: int = 0
    opened: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)


class SessionRegistry:
    """Thread-safe table of sessions: admission, limits, counters and idle reaping. Closing one marks it closed;
    its own stream handler gives its KV slot back once nothing of it is running."""

    def __init__(self, max_sessions: int, idle_timeout_s: float):
        self.max_sessions, self.idle_timeout_s = max_sessions, idle_timeout_s
        self.counters = Counters()
        self.draining = False
        self._sessions: dict[SessionId, Session] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._calls = 0  # stateless calls in progress: each holds a slot like a session while it runs
        if idle_timeout_s > 0:
            threading.Thread(target=self._reaper, daemon=True, name="idle-reaper").start()

    def open(self, peer: str, max_length: int, cancel: callable) -> Session:
        with self._lock:
            self._admit()
            s = Session(f"s{next(self._ids)}", peer, max_length, cancel)
            self._sessions[s.id] = s
            self.counters.active_sessions = len(self._sessions)
            self.counters.total_sessions += 1
            logger.info(  # under the lock: the log's order is the admissions' (a drain's line comes after)
                "session %s opened by %s (max %d tokens); %d active", s.id, peer, max_length, len(self._sessions)
            )
        return s

    def lock(self) -> threading.Lock:
        """The lock that admissions hold (a drain takes it to refuse new sessions from a known instant)."""
        return self._lock

    def _admit(self) -> None:
        """Under the lock: room for one more session or stateless call, or the reason why not."""
        if self.draining:
            raise ServerDraining("draining: this trunk server is shutting down; retry on another replica or later")
        if len(self._sessions) + self._calls >= self.max_sessions:
            raise LimitExceeded(
                f"too many sessions: the server's limit (max sessions) is {self.max_sessions}; sessions, training "
                f"sessions and stateless calls in progress all count"
            )

    @contextlib.contextmanager
    def call(self):
        """A stateless call holds a slot of max sessions while it runs, so it cannot get past the limit."""
        with self._lock:
            self._admit()
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1

    def close(self, sid: SessionId, reason: str = "closed") -> None:
        with self._lock:
            s = self._sessions.pop(sid, None)
            self.counters.active_sessions = len(self._sessions)
        if s is not None:
            s.closed = True  # the cache is freed by the session's stream handler (a step may be running on it)
            logger.info(
                "session %s %s after %d steps, %.1f s; %d active",
                sid,
                reason,
                s.next_step,
                time.monotonic() - s.opened,
                self.counters.active_sessions,
            )

    def end_all(self, reason: str) -> int:
        """End every open session now (a drain whose grace ran out), telling each client `reason`; returns how many
        there were."""
        with self._lock:
            open_now = list(self._sessions.values())
        for s in open_now:
            self.close(s.id, "ended by the drain")
            s.cancel(reason)
        return len(open_now)

    def record_steps(self, steps: int, compute_ms: float) -> None:
        """`steps` steps have run, taking `compute_ms` of compute in all."""
        with self._lock:
            self.counters.total_steps += steps
            self.counters.total_compute_ms += compute_ms

    def active(self) -> int:
        return len(self._sessions)

    def _reaper(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 4))
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._sessions.values() if now - s.last_active > self.idle_timeout_s]
            for s in idle:
                logger.warning("session %s idle for more than %g s: closing it", s.id, self.idle_timeout_s)
                self.close(s.id, "closed for idleness")
                s.cancel(f"idle for more than {self.idle_timeout_s:g} s")

    def shutdown(self) -> None:
        self._stop.set()
