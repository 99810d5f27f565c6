"""The logic behind the apps' tabs: statistics panel, tables, chart data, per-session history."""

from __future__ import annotations

import time

from client.app import server_markdown
from splitcore.stats import GenerationStats, TokenTiming
from webui import charts


def split_stats(n=6) -> GenerationStats:
    s = GenerationStats(prompt_tokens=4, wall_s=0.5)
    for i in range(n):
        total = 40.0 if i == 0 else 10.0 + i
        s.add(TokenTiming(total, 5.0, 3.0, total - 8.0, 3093 if i else 12317, 3101 if i else 12325))
    return s


def full_stats(n=6) -> GenerationStats:
    s = GenerationStats(prompt_tokens=4, wall_s=0.3)
    for i in range(n):
        s.add(TokenTiming(30.0 if i == 0 else 8.0, 30.0 if i == 0 else 8.0))
    return s


def test_stats_markdown_split_breakdown():
    md = charts.stats_markdown(split_stats())
    assert "40.0 ms" in md  # time to first token
    assert "| 12.0 ms | 12.0 tokens/s" not in md and "12.0" in md
    assert "server compute" in md and "3.0 ms" in md and "3,093 / 3,101" in md
    full = charts.stats_markdown(full_stats())
    assert "server compute" not in full and "30.0 ms" in full
    assert "Generating" in charts.stats_markdown(GenerationStats(), running=True)


def test_token_table_columns():
    t = charts.token_table(split_stats())
    assert list(t.columns) == ["token", "total_ms", "client_ms", "server_ms", "network_ms", "bytes_out", "bytes_in"]
    assert len(t) == 6 and t["server_ms"].tolist() == [3.0] * 6
    f = charts.token_table(full_stats())
    assert list(f.columns) == ["token", "total_ms", "compute_ms"]
    assert charts.token_table(None).empty


def test_timeline_stacks_client_server_network():
    fig = charts.latency_timeline(split_stats())
    assert [tr.name for tr in fig.data] == ["client", "server", "network"]
    assert fig.layout.barmode == "stack"
    totals = [sum(tr.y[i] for tr in fig.data) for i in range(6)]
    assert totals == [t.total_ms for t in split_stats().tokens]
    assert [tr.name for tr in charts.latency_timeline(full_stats()).data] == ["total"]


def test_histogram_uses_decode_latencies():
    fig = charts.latency_histogram(split_stats())
    assert list(fig.data[0].x) == split_stats().decode_ms  # the first token (prefill) is left out
    assert len(charts.latency_histogram(None).data[0].x or []) == 0


def test_history_is_per_session_and_bounded():
    a, b = charts.History(), charts.History()
    a.add("hello", split_stats())
    assert len(a.records) == 1 and b.latest is None and charts.history_table(b).empty
    for i in range(charts.MAX_RECORDS + 5):
        a.add(f"p{i}", full_stats())
    assert len(a.records) == charts.MAX_RECORDS
    table = charts.history_table(a)
    assert table["prompt"].iloc[0] == f"p{charts.MAX_RECORDS + 4}"  # newest first


def _sample(t, gpu=False, **kw):
    s = dict(
        timestamp=t,
        cpu_percent=50.0,
        mem_used_bytes=2 * 2**30,
        mem_total_bytes=8 * 2**30,
        process_rss_bytes=2**29,
        gpu_available=gpu,
        gpu_status="H100" if gpu else "no GPU: CPU",
        gpu_util_percent=70.0 if gpu else 0.0,
        gpu_mem_used_bytes=2**30 if gpu else 0,
        gpu_mem_total_bytes=4 * 2**30 if gpu else 0,
        gpu_temperature_c=50.0,
        active_sessions=2,
        total_sessions=3,
        total_steps=100,
        steps_per_s=30.0,
        mean_compute_ms=11.5,
        uptime_s=10.0,
    )
    s.update(kw)
    return s


def test_monitor_figures_and_table():
    now = time.time()
    samples = [_sample(now + i, cpu_percent=float(i)) for i in range(15)]
    host, gpu = charts.monitor_figures(samples)
    assert [tr.name for tr in host.data] == ["CPU %", "memory %", "server RSS (GiB)"]
    assert list(host.data[0].y) == [float(i) for i in range(15)]
    assert list(host.data[1].y) == [25.0] * 15
    assert len(gpu.data) == 0 and gpu.layout.annotations[0].text == "no GPU: CPU"
    _, gpu = charts.monitor_figures([_sample(now + i, gpu=True) for i in range(3)])
    assert [tr.name for tr in gpu.data] == ["GPU util %", "GPU memory %"] and list(gpu.data[1].y) == [25.0] * 3
    table = charts.monitor_table(samples)
    assert len(table) == 10 and table["cpu_%"].iloc[0] == 14.0  # last 10, newest first
    assert table["gpu_%"].isna().all() and table["sessions"].tolist() == [2] * 10


def test_batching_figure_charts_batches_slots_and_wait():
    now = time.time()
    samples = [
        _sample(now + i, batch_mean=1.0 + i, batch_max=2 + i, kv_slots_used=i, queue_wait_ms=0.5) for i in range(4)
    ]
    fig = charts.batching_figure(samples)
    assert [tr.name for tr in fig.data] == ["batch size (mean)", "batch size (max)", "KV slots used", "queue wait (ms)"]
    assert list(fig.data[0].y) == [1.0, 2.0, 3.0, 4.0] and list(fig.data[2].y) == [0, 1, 2, 3]
    assert charts.monitor_table(samples)["batch"].iloc[0] == 4.0
    busy = [_sample(now + i, compute_busy_percent=10.0 * i) for i in range(3)]
    host, _ = charts.monitor_figures(busy)
    assert host.data[-1].name == "trunk compute busy %" and list(host.data[-1].y) == [0.0, 10.0, 20.0]
    assert charts.monitor_table(busy)["busy_%"].iloc[0] == 20.0


def test_monitor_sample_says_how_busy_the_runtime_was():
    """compute_busy_percent: the runtime's compute time between two samples over the time between them."""
    import types

    from server.monitor import Sampler

    class NoGpu:
        def fill(self, s):
            s["gpu_available"] = False

    stats = types.SimpleNamespace(
        batches=0, batched_rows=0, batch_sizes={}, queue_wait_ms=0.0, waited=0, compute_ms=0.0
    )
    runtime = types.SimpleNamespace(stats=stats, slots=4, used_slots=lambda: 1)
    clock = iter([100.0, 100.3, 100.4])  # the sampler's clock, s
    sampler = Sampler(NoGpu(), time.time(), clock=lambda: next(clock))
    counters = types.SimpleNamespace(active_sessions=1, total_sessions=1, total_steps=0, total_compute_ms=0.0)
    first = sampler.sample(counters, runtime)
    stats.compute_ms += 150.0  # 150 ms of compute in 300 ms
    second = sampler.sample(counters, runtime)
    assert first.get("compute_busy_percent", 0.0) == 0.0  # unset in the first sample, as in the message
    assert abs(second["compute_busy_percent"] - 50.0) < 1e-6
    stats.compute_ms += 10_000.0  # more than the wall time: clamped
    assert sampler.sample(counters, runtime)["compute_busy_percent"] == 100.0


def test_monitor_tab_text_without_server():
    class Local:
        pass

    line, status = server_markdown(Local(), None)
    assert "in this process" in line and status == ""
