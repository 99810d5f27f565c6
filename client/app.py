"""The split client's Gradio app (port 7860): generation, trunk server monitoring, latency analysis, fine-tuning."""

from __future__ import annotations

import argparse
import logging

import gradio as gr
import pandas as pd

from client.finetune_tab import finetune_tab
from client.monitor_feed import MonitorFeed, Monitors
from client.split_engine import SplitEngine
from webui import charts, ui

logger = logging.getLogger(__name__)


def server_markdown(engine: SplitEngine, feed: MonitorFeed | None, address: str = "") -> tuple[str, str]:
    """(trunk info line, status line) for the monitoring tab: of the replica at `address` (default: the server)."""
    if feed is None:
        return "The trunk runs in this process: there is no server to monitor.", ""
    address = address or engine.cfg.server
    info, samples, error = feed.snapshot()
    status = f"⚠️ {error}" if error else ""
    if info is None:
        return f"Trunk server `{address}`: not reached yet.", status
    weights = " (random weights)" if info.random_weights else ""
    last = samples[-1] if samples else {}
    line = (
        f"**Trunk server** `{address}` · model `{info.model}`{weights} · blocks "
        f"{info.split_start}-{info.split_end - 1} of {info.n_layer} · {info.device}, {info.dtype} · "
        f"active sessions: {last.get('active_sessions', info.active_sessions)} · "
        f"{last.get('gpu_status', '')}"
    )
    return line, status


def build_app(
    engine: SplitEngine,
    monitor_interval_s: float = 1.0,
    speculate: str = "none",
    meter=None,
    data_dir: str | None = None,
) -> tuple[gr.Blocks, Monitors | None]:
    """The app; with `meter` (client/privacy.py, prepared) the generation tab shows what the trunk could read. With
    several replicas, the monitoring tab shows each, and the charts of the one picked."""
    monitors = None if engine.trunk_client is None else Monitors(engine.trunk_client, monitor_interval_s)
    addresses = list(monitors.feeds) if monitors else []
    where = f"**Split:** blocks 0-{engine.split.s1 - 1} and {engine.split.s2}-{engine.model.config.n_layer - 1}"
    where += f" here · **Trunk:** {engine.trunk_label}"
    page = ui.app_page("GPT-2 split client", engine, "GPT-2 split inference: client", where, speculate, meter)
    with page as (demo, history, adapter_switch):
        with gr.Tab("Server monitoring"):
            several = len(addresses) > 1
            replicas = gr.Dataframe(label="Replicas", interactive=False, visible=several, elem_id="replicas")
            pick = gr.Dropdown(addresses, value=addresses[0] if addresses else None, label="Replica", visible=several)
            info_md = gr.Markdown()
            status_md = gr.Markdown(elem_classes="error-banner")
            with gr.Row():
                host_plot = gr.Plot(label="CPU and memory")
                gpu_plot = gr.Plot(label="GPU")
            batch_plot = gr.Plot(label="Batches and slots")
            table = gr.Dataframe(label="Last 10 samples", interactive=False)

            def refresh_monitor(address):
                feed = monitors.feeds.get(address) if monitors else None
                line, status = server_markdown(engine, feed, address if several else "")
                samples = feed.snapshot()[1] if feed else []
                host, gpu = charts.monitor_figures(samples)
                summary = pd.DataFrame(monitors.summary() if monitors else [])
                return (
                    line,
                    status,
                    host,
                    gpu,
                    charts.batching_figure(samples),
                    charts.monitor_table(samples),
                    summary,
                )

            outs = [info_md, status_md, host_plot, gpu_plot, batch_plot, table, replicas]
            gr.Timer(2.0).tick(refresh_monitor, pick, outs, show_progress="hidden")
            pick.change(refresh_monitor, pick, outs)
            demo.load(refresh_monitor, pick, outs)
        with gr.Tab("Latency analysis"):
            ui.latency_tab(history)
        if engine.trunk_client is not None:
            with gr.Tab("Fine-tune"):
                finetune_tab(engine, adapter_switch, data_dir)
    return demo, monitors


def serve(engine: SplitEngine, args: argparse.Namespace, login: tuple[str, str] | None = None) -> None:
    engine.check_speculate(args.speculate)
    meter = None
    if engine.cfg.privacy_meter:
        from client.privacy import prepare_meter

        meter = prepare_meter(engine)
    demo, monitors = build_app(engine, speculate=args.speculate, meter=meter, data_dir=args.data_dir)
    logger.info("split client app on %s:%d, trunk %s", args.host, args.port, engine.trunk_label)
    try:
        ui.launch(demo, args.host, args.port, login=login)
    finally:
        if monitors:
            monitors.stop()
        engine.close()
