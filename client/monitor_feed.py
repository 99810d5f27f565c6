"""Keeps each trunk replica's monitor stream flowing into a ring buffer for the app, reconnecting as needed."""

from __future__ import annotations

import collections
import logging
import threading

from splitcomm import messages
from splitcomm.errors import TrunkError
from splitcomm.messages import message_dict
from splitcomm.trunk_client import TrunkClient

logger = logging.getLogger(__name__)

HISTORY = 300  # samples kept (5 min at the default 1 s interval)


class MonitorFeed:
    """A daemon thread reading the server's monitor stream; `snapshot()` is what the app shows."""

    def __init__(self, client: TrunkClient, interval_s: float = 1.0, retry_s: float = 2.0):
        self.client, self.interval_s, self.retry_s = client, interval_s, retry_s
        self.samples: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self.info: messages.ServerInfo | None = None
        self.error: str | None = "connecting to the trunk server..."
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="monitor-feed")

    def start(self) -> MonitorFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.info = self.client.info()
                stream = self.client.monitor(self.interval_s)
                for s in stream:
                    self.error = None
                    self.samples.append(message_dict(s))
                    if self._stop.is_set():
                        stream.close()
                        return
                    if s.active_sessions != self.info.active_sessions:
                        self.info.active_sessions = s.active_sessions
                self.error = "the trunk server ended the monitor stream"
            except TrunkError as e:
                if self.error != str(e):
                    logger.warning("monitor: %s", e)
                self.error = str(e)
            self._stop.wait(self.retry_s)

    def snapshot(self) -> tuple[messages.ServerInfo | None, list[dict], str | None]:
        return self.info, list(self.samples), self.error

    def stop(self) -> None:
        self._stop.set()


class Monitors:
    """A MonitorFeed for each replica the client knows by address (one, for a single server): `feeds` by address."""

    def __init__(self, client: TrunkClient, interval_s: float = 1.0):
        self.feeds = {c.cfg.target: MonitorFeed(c, interval_s).start() for c in client.replicas()}

    def summary(self) -> list[dict]:
        """One row per replica: how it is and what it does now, from its latest sample."""
        rows = []
        for address, feed in self.feeds.items():
            info, samples, error = feed.snapshot()
            last = samples[-1] if samples and not error else {}
            rows.append(
                {
                    "replica": address,
                    "state": "serving" if last else f"down: {error}" if error else "connecting",
                    "model": f"{info.model} blocks {info.split_start}-{info.split_end - 1}" if info else "",
                    "sessions": last.get("active_sessions"),
                    "served": last.get("total_sessions"),
                    "steps/s": round(last["steps_per_s"], 1) if last else None,
                    "batch": round(last.get("batch_mean", 0.0), 1) if last else None,
                    "busy_%": round(last.get("compute_busy_percent", 0.0), 1) if last else None,
                }
            )
        return rows

    def stop(self) -> None:
        for feed in self.feeds.values():
            feed.stop()
