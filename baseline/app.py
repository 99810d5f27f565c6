"""The full-model Gradio app (port 7861): the same generation and statistics as the split client."""

from __future__ import annotations

import argparse
import logging

import gradio as gr

from splitcore.engine import FullEngine
from webui import ui

logger = logging.getLogger(__name__)


def build_app(engine: FullEngine, speculate: str = "none") -> gr.Blocks:
    where = f"**Unsplit:** all {engine.model.config.n_layer} blocks in this process · {engine.device}, "
    where += str(engine.dtype).removeprefix("torch.")
    with ui.app_page("GPT-2 full model", engine, "GPT-2 full model (baseline)", where, speculate) as (demo, history, _):
        with gr.Tab("Performance"):
            ui.latency_tab(history)
    return demo


def serve(engine: FullEngine, args: argparse.Namespace, login: tuple[str, str] | None = None) -> None:
    logger.info("full-model app on %s:%d", args.host, args.port)
    engine.check_speculate(args.speculate)
    ui.launch(build_app(engine, args.speculate), args.host, args.port, login=login)
