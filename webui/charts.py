"""Tables and plotly figures for the apps' statistics, latency and monitoring tabs; pure functions, no Gradio."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

from splitcore.stats import GenerationStats, summarize

COLORS = {"client": "#4C78A8", "server": "#F58518", "network": "#54A24B", "total": "#4C78A8"}
MAX_RECORDS = 50  # generations kept per browser session


@dataclass
class GenerationRecord:
    started: float  # Unix time
    prompt: str
    stats: GenerationStats


@dataclass
class History:
    """One browser session's generations (held in gr.State, so users never see each other's numbers)."""

    records: list[GenerationRecord] = field(default_factory=list)

    def add(self, prompt: str, stats: GenerationStats) -> None:
        self.records.append(GenerationRecord(time.time(), prompt, stats))
        del self.records[:-MAX_RECORDS]

    @property
    def latest(self) -> GenerationStats | None:
        return self.records[-1].stats if self.records else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def stats_markdown(stats: GenerationStats, running: bool = False) -> str:
    """The statistics panel under the generated text."""
    if not stats.tokens:
        return "_Generating..._" if running else "_No tokens yet._"
    d = summarize(stats.decode_ms)
    head = "Generating..." if running else "Done"
    rows = [
        f"**{head}**: {len(stats.tokens)} tokens in {stats.wall_s:.2f} s",
        "",
        "| time to first token | tokens/s | mean | median | p90 | p99 |",
        "|---|---|---|---|---|---|",
        f"| {stats.ttft_ms:.1f} ms | {stats.tokens_per_s:.1f} | {d['mean']:.1f} ms | {d['median']:.1f} ms "
        f"| {d['p90']:.1f} ms | {d['p99']:.1f} ms |",
    ]
    t = stats.tokens[1:] or stats.tokens
    server = _mean([x.server_ms for x in t])
    if server is not None:
        client, network = _mean([x.client_ms for x in t]), _mean([x.network_ms for x in t])
        total = _mean([x.total_ms for x in t]) or 1.0
        rows += [
            "",
            "| per decode token | client compute | server compute | network | bytes out / in |",
            "|---|---|---|---|---|",
            f"| {total:.1f} ms | {client:.1f} ms ({100 * client / total:.0f}%) | {server:.1f} ms "
            f"({100 * server / total:.0f}%) | {network:.1f} ms ({100 * network / total:.0f}%) "
            f"| {_mean([x.bytes_out for x in t]):,.0f} / {_mean([x.bytes_in for x in t]):,.0f} |",
        ]
    if stats.speculation is not None and stats.speculation.calls:
        d = stats.speculation.to_dict(len(stats.tokens))
        rows += [
            "",
            f"**Speculative decoding** ({d['source']}): {d['verifications']} verifications, "
            f"{d['accepted']} of {d['drafted']} drafts accepted ({100 * d['acceptance_rate']:.0f}%), "
            f"{d['tokens_per_round_trip']:.2f} tokens per round trip, {d['mean_draft_length']:.1f} drafts a round",
        ]
    return "\n".join(rows)


def token_table(stats: GenerationStats | None) -> pd.DataFrame:
    """One row per token: latency and where it went."""
    cols = ["token", "total_ms", "client_ms", "server_ms", "network_ms", "bytes_out", "bytes_in"]
    if stats is None or not stats.tokens:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(stats.rows())[cols].round(3)
    if df["server_ms"].isna().all():  # full model: no server, no network, no bytes
        df = df[["token", "total_ms", "client_ms"]].rename(columns={"client_ms": "compute_ms"})
    return df


def history_table(history: History) -> pd.DataFrame:
    """One row per generation of this browser session, newest first."""
    rows = []
    for r in reversed(history.records):
        d = summarize(r.stats.decode_ms)
        rows.append(
            {
                "time": time.strftime("%H:%M:%S", time.localtime(r.started)),
                "prompt": r.prompt[:40] + ("..." if len(r.prompt) > 40 else ""),
                "tokens": len(r.stats.tokens),
                "ttft_ms": round(r.stats.ttft_ms, 1),
                "tokens_per_s": round(r.stats.tokens_per_s, 1),
                "median_ms": round(d["median"], 2),
                "p90_ms": round(d["p90"], 2),
                "p99_ms": round(d["p99"], 2),
                **_speculation_columns(r.stats),
            }
        )
    columns = ["time", "prompt", "tokens", "ttft_ms", "tokens_per_s", "median_ms", "p90_ms", "p99_ms"]
    return pd.DataFrame(rows, columns=columns + ["speculation", "acceptance", "tokens_per_round_trip"])


def _speculation_columns(stats: GenerationStats) -> dict:
    if stats.speculation is None:
        return {"speculation": "none", "acceptance": None, "tokens_per_round_trip": None}
    d = stats.speculation.to_dict(len(stats.tokens))
    return {
        "speculation": d["source"],
        "acceptance": round(d["acceptance_rate"], 3),
        "tokens_per_round_trip": round(d["tokens_per_round_trip"], 2),
    }


def _layout(fig: go.Figure, title: str, x: str | None, y: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        height=340,
        margin=dict(l=50, r=20, t=50, b=40),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def latency_histogram(stats: GenerationStats | None) -> go.Figure:
    """Distribution of per-token latency after the first token."""
    values = stats.decode_ms if stats else []
    fig = go.Figure(go.Histogram(x=values, nbinsx=30, marker_color=COLORS["total"], name="decode"))
    return _layout(fig, "Per-token latency (decode)", "ms", "tokens")


def latency_timeline(stats: GenerationStats | None) -> go.Figure:
    """Each token's latency over the generation, stacked by client / server / network when split."""
    tokens = stats.tokens if stats else []
    x = list(range(len(tokens)))
    fig = go.Figure()
    if tokens and tokens[0].server_ms is not None:
        for part in ("client", "server", "network"):
            fig.add_bar(x=x, y=[getattr(t, f"{part}_ms") or 0.0 for t in tokens], name=part, marker_color=COLORS[part])
        fig.update_layout(barmode="stack")
    else:
        fig.add_bar(x=x, y=[t.total_ms for t in tokens], name="total", marker_color=COLORS["total"])
    return _layout(fig, "Latency per token (token 0 includes the prefill)", "token", "ms")


def monitor_frame(samples: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(samples)


def monitor_figures(samples: list[dict]) -> tuple[go.Figure, go.Figure]:
    """CPU / memory and GPU history of the trunk host from monitor samples (dicts of MonitorSample fields)."""
    df = monitor_frame(samples)
    host = go.Figure()
    gpu = go.Figure()
    if not df.empty:
        t = pd.to_datetime(df["timestamp"], unit="s")
        host.add_scatter(x=t, y=df["cpu_percent"], name="CPU %", mode="lines")
        host.add_scatter(x=t, y=100 * df["mem_used_bytes"] / df["mem_total_bytes"], name="memory %", mode="lines")
        host.add_scatter(x=t, y=df["process_rss_bytes"] / 2**30, name="server RSS (GiB)", mode="lines", yaxis="y2")
        if "compute_busy_percent" in df:  # the runtime's own busy share: on a GPU host, next to NVML's utilisation
            host.add_scatter(x=t, y=df["compute_busy_percent"], name="trunk compute busy %", mode="lines")
        host.update_layout(yaxis2=dict(overlaying="y", side="right", title="GiB", rangemode="tozero"))
        if df["gpu_available"].any():
            gpu.add_scatter(x=t, y=df["gpu_util_percent"], name="GPU util %", mode="lines")
            gpu.add_scatter(
                x=t,
                y=100 * df["gpu_mem_used_bytes"] / df["gpu_mem_total_bytes"].clip(lower=1),
                name="GPU memory %",
                mode="lines",
            )
        else:
            gpu.add_annotation(
                text=str(df["gpu_status"].iloc[-1]),
                showarrow=False,
                x=0.5,
                y=0.5,
                xref="paper",
                yref="paper",
                font=dict(size=16),
            )
            gpu.update_xaxes(visible=False)
            gpu.update_yaxes(visible=False)
    host.update_layout(yaxis=dict(range=[0, 100]))
    gpu.update_layout(yaxis=dict(range=[0, 100]))
    return (_layout(host, "Trunk host: CPU and memory", None, "%"), _layout(gpu, "Trunk host: GPU", None, "%"))


def batching_figure(samples: list[dict]) -> go.Figure:
    """The trunk's scheduler from monitor samples: decode steps per batched forward (mean and max), KV slots in
    use, and how long a step waited for the compute (right axis)."""
    df = monitor_frame(samples)
    fig = go.Figure()
    if not df.empty and "batch_mean" in df:
        t = pd.to_datetime(df["timestamp"], unit="s")
        fig.add_scatter(x=t, y=df["batch_mean"], name="batch size (mean)", mode="lines")
        fig.add_scatter(x=t, y=df["batch_max"], name="batch size (max)", mode="lines", line=dict(dash="dot"))
        fig.add_scatter(x=t, y=df["kv_slots_used"], name="KV slots used", mode="lines")
        fig.add_scatter(x=t, y=df["queue_wait_ms"], name="queue wait (ms)", mode="lines", yaxis="y2")
        fig.update_layout(yaxis2=dict(overlaying="y", side="right", title="ms", rangemode="tozero"))
    fig.update_layout(yaxis=dict(rangemode="tozero"))
    return _layout(fig, "Trunk scheduler: batches, slots and queue wait", None, "rows / slots")


def monitor_table(samples: list[dict], n: int = 10) -> pd.DataFrame:
    """The last `n` samples, newest first, in human units."""
    cols = ["time", "cpu_%", "mem_GiB", "rss_GiB", "gpu_%", "gpu_mem_GiB", "sessions", "steps/s", "compute_ms"]
    cols += ["batch", "slots_used", "wait_ms", "busy_%"]
    rows = [
        {
            "time": time.strftime("%H:%M:%S", time.localtime(s["timestamp"])),
            "cpu_%": round(s["cpu_percent"], 1),
            "mem_GiB": round(s["mem_used_bytes"] / 2**30, 2),
            "rss_GiB": round(s["process_rss_bytes"] / 2**30, 2),
            "gpu_%": round(s["gpu_util_percent"], 1) if s["gpu_available"] else None,
            "gpu_mem_GiB": round(s["gpu_mem_used_bytes"] / 2**30, 2) if s["gpu_available"] else None,
            "sessions": s["active_sessions"],
            "steps/s": round(s["steps_per_s"], 1),
            "compute_ms": round(s["mean_compute_ms"], 2),
            "batch": round(s.get("batch_mean", 0.0), 1),
            "slots_used": s.get("kv_slots_used", 0),
            "wait_ms": round(s.get("queue_wait_ms", 0.0), 2),
            "busy_%": round(s.get("compute_busy_percent", 0.0), 1),
        }
        for s in reversed(samples[-n:])
    ]
    return pd.DataFrame(rows, columns=cols)
