"""Keeps the trunk server's monitor stream flowing into a ring buffer for the app, reconnecting as needed."""

from __future__ import annotations

import collections
import logging
import threading

from splitcomm.errors import TrunkError
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.trunk_client import TrunkClient

logger = logging.getLogger(__name__)

HISTORY = 300  # samples kept (5 min at the default 1 s interval)


def sample_dict(s: pb.MonitorSample) -> dict:
    """Field name -> value, numbers kept as numbers (MessageToDict would turn uint64 into strings)."""
    return {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}


class MonitorFeed:
    """A daemon thread reading the server's monitor stream; `snapshot()` is what the app shows."""

    def __init__(self, client: TrunkClient, interval_s: float = 1.0, retry_s: float = 2.0):
        self.client, self.interval_s, self.retry_s = client, interval_s, retry_s
        self.samples: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self.info: pb.ServerInfo | None = None
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
                    self.samples.append(sample_dict(s))
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

    def snapshot(self) -> tuple[pb.ServerInfo | None, list[dict], str | None]:
        return self.info, list(self.samples), self.error

    def stop(self) -> None:
        self._stop.set()
