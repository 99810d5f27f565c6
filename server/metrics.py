"""Prometheus metrics of the trunk server (`--metrics-port`): steps and tokens by kind, decode batch sizes,
queue wait, sessions, KV slots and errors by status code. Counters the servicer bumps as it goes; the rest is read
from the runtime and the session table at each scrape, so nothing is counted twice."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class _FromRuntime:
    """A collector over the runtime's running totals: read at scrape time."""

    def __init__(self, runtime, sessions):
        self.runtime, self.sessions = runtime, sessions

    def collect(self):
        rt = self.runtime
        stats = rt.stats
        sizes = dict(stats.batch_sizes)
        buckets = [(str(edge), sum(n for rows, n in sizes.items() if rows <= edge)) for edge in BATCH_BUCKETS]
        buckets.append(("+Inf", stats.batches))  # cumulative counts, as Prometheus wants them
        h = HistogramMetricFamily("trunk_decode_batch_rows", "Decode steps per batched forward")
        h.add_metric([], buckets, sum_value=stats.batched_rows)
        yield h
        yield CounterMetricFamily(
            "trunk_compute_seconds",
            "Time the runtime spent computing (decode batches and work alone): its rate is the device's busy share",
            value=stats.compute_ms / 1e3,
        )
        used = rt.used_slots()
        g = GaugeMetricFamily("trunk_kv_slots", "KV slots of the pool", labels=["state"])
        g.add_metric(["used"], used)
        g.add_metric(["free"], rt.slots - used)
        yield g
        yield GaugeMetricFamily("trunk_kv_slot_bytes", "Bytes of one KV slot", value=rt.slot_bytes)
        yield GaugeMetricFamily(
            "trunk_sessions", "Open sessions (inference and training)", value=self.sessions.active()
        )
        yield GaugeMetricFamily(
            "trunk_queue_wait_seconds_mean",
            "Mean wait of a step before it ran, since start",
            value=stats.queue_wait_ms / 1e3 / stats.waited if stats.waited else 0.0,
        )


class Metrics:
    """The server's metrics in a registry of their own, served over HTTP by `serve(port)`."""

    def __init__(self, runtime, sessions):
        self.registry = CollectorRegistry()
        self.steps = Counter("trunk_steps", "Steps run, by kind", ["kind"], registry=self.registry)
        self.tokens = Counter("trunk_tokens", "Positions computed, by kind", ["kind"], registry=self.registry)
        self.errors = Counter(
            "trunk_errors", "Requests refused or failed, by gRPC status", ["code"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "trunk_queue_wait_seconds",
            "Wait of a session step before its forward started",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[str, tuple] = {}  # per step kind: its steps and tokens counters
        self._collector = _FromRuntime(runtime, sessions)
        self.registry.register(self._collector)
        runtime.scheduler.on_wait = self.queue_wait.observe  # seconds each piece of work waited for the scheduler
        self.port: int | None = None
        self._server = None

    def step(self, kind: str, tokens: int, steps: int = 1) -> None:
        """`steps` steps of `kind` have run, `tokens` positions in all."""
        children = self._children.get(kind)
        if children is None:  # a label lookup is a lock and a dict of tuples: once per kind, not per step
            children = self._children[kind] = (self.steps.labels(kind), self.tokens.labels(kind))
        children[0].inc(steps)
        children[1].inc(tokens)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = a free port); returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
