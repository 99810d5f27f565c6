"""Prometheus metrics of the trunk server (`--metrics-port`): steps and tokens by kind, decode batch sizes,
queue wait, sessions, KV slots and errors by status code; with gRPC fronts, the fronts connected and the relay
batches and their items. Counters the servicer bumps as it goes; the rest is
read from the runtime and the session table at each scrape, so nothing is counted twice."""

from __future__ import annotations

import bisect
import itertools
import logging
import threading

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class CountedHistogram:
    """A histogram whose `observe` takes a count: the steps of a relay batch start as one piece of work and waited
    alike, so a batch of 64 is one bisect and one addition on the scheduler thread, not 64 observations
    (prometheus-client's Histogram takes one value at a time, about 0.75 µs each)."""

    def __init__(self, name: str, documentation: str, edges: tuple[float, ...]):
        self.name, self.documentation, self.edges = name, documentation, edges
        self._counts = [0] * (len(edges) + 1)  # the last: above every edge
        self._sum = 0.0
        self._lock = threading.Lock()  # the scheduler observes, the HTTP thread collects

    def observe(self, value: float, count: int = 1) -> None:
        i = bisect.bisect_left(self.edges, value)  # the first edge >= value: Prometheus buckets are "le"
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        buckets = [(floatToGoString(e), n) for e, n in zip(self.edges, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        h = HistogramMetricFamily(self.name, self.documentation)
        h.add_metric([], buckets, sum_value=total)
        yield h


class _FromRuntime:
    """A collector over the runtime's running totals: read at scrape time."""

    def __init__(self, runtime, sessions):
        self.runtime, self.sessions = runtime, sessions
        self.relay = None  # the relay's RelayStats, on a server with gRPC fronts

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
        if self.relay is not None:  # a server with gRPC fronts
            r = self.relay
            yield GaugeMetricFamily("trunk_fronts", "gRPC fronts connected to this server", value=r.fronts)
            batches = CounterMetricFamily("trunk_relay_batches", "Relay batches, by direction", labels=["direction"])
            items = CounterMetricFamily(
                "trunk_relay_items", "Messages and events in relay batches, by direction", labels=["direction"]
            )
            rows = CounterMetricFamily(
                "trunk_relay_rows",
                "Of the items, decode steps packed as rows (in) and their answers (out): steps that started with no "
                "message parsed or built on the engine",
                labels=["direction"],
            )
            for direction, b, i, n in (
                ("in", r.batches_in, r.items_in, r.rows_in),
                ("out", r.batches_out, r.items_out, r.rows_out),
            ):
                batches.add_metric([direction], b)
                items.add_metric([direction], i)
                rows.add_metric([direction], n)
            yield batches
            yield items
            yield rows


class Metrics:
    """The server's metrics in a registry of their own, served over HTTP by `serve(port)`."""

    def __init__(self, runtime, sessions):
        self.registry = CollectorRegistry()
        self.steps = Counter("trunk_steps", "Steps run, by kind", ["kind"], registry=self.registry)
        self.tokens = Counter("trunk_tokens", "Positions computed, by kind", ["kind"], registry=self.registry)
        self.errors = Counter(
            "trunk_errors", "Requests refused or failed, by gRPC status", ["code"], registry=self.registry
        )
        self.queue_wait = CountedHistogram(
            "trunk_queue_wait_seconds", "Wait of a session step before its forward started", WAIT_BUCKETS
        )
        self.registry.register(self.queue_wait)
        self._children: dict[str, tuple] = {}  # per step kind: its steps and tokens counters
        self._collector = _FromRuntime(runtime, sessions)
        self.registry.register(self._collector)
        runtime.on_wait = self.queue_wait.observe  # seconds each piece of work waited for the scheduler, its steps
        self.port: int | None = None
        self._server = None

    def relay(self, stats) -> None:
        """Report the relay of a server with gRPC fronts too (its RelayStats)."""
        self._collector.relay = stats

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
