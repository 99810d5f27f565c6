"""The split client app's Fine-tune tab: data by upload or path, the settings, Start and Stop, live loss and
held-out perplexity curves; when a run ends, the generation tab can use its adapter (a switch turns it off)."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from client.config import CLIENT_TRAIN
from client.split_training import Run, SplitTrainer, TrainConfig, TrainEvent
from splitcore.errors import SplitError
from splitcore.training import TextData, perplexity
from webui import ui

logger = logging.getLogger(__name__)


class BackgroundRun(ui.Background):
    """A training run on a worker thread; `events()` yields its TrainEvents and re-raises its error."""

    def __init__(self, engine, cfg: TrainConfig):
        self.run: Run | None = None

        def work(put, stopped) -> None:
            trainer = None
            try:
                data = TextData.from_path(cfg.data, engine.encode, cfg.block_size)
                trainer = SplitTrainer(engine, cfg.lora(), cfg.client_train)
                self.run = Run(trainer, data, cfg, engine.model.spec)
                if stopped.is_set():
                    self.run.stop()
                for ev in self.run:
                    put(ev)
            finally:
                if trainer is not None:
                    trainer.close()

        super().__init__(work, "fine-tune")

    def stop(self) -> None:
        super().stop()
        if self.run is not None:
            self.run.stop()


def curves(losses: list[list[float]], evals: list[list[float]]) -> tuple[go.Figure, go.Figure]:
    loss = go.Figure(go.Scatter(x=[s for s, _ in losses], y=[v for _, v in losses], mode="lines", name="loss"))
    loss.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss", template="plotly_white")
    ppl = go.Figure(
        go.Scatter(x=[s for s, _ in evals], y=[perplexity(v) for _, v in evals], mode="lines+markers", name="ppl")
    )
    ppl.update_layout(
        title="Held-out perplexity", xaxis_title="step", yaxis_title="perplexity", template="plotly_white"
    )
    return loss, ppl


def _status(ev: TrainEvent, cfg: TrainConfig) -> str:
    if ev.kind == "step":
        s = ev.stats
        tok_s = cfg.batch_size * cfg.block_size / (s.ms / 1e3)
        kb = (s.bytes_out + s.bytes_in) / 1e3
        return f"step {ev.step}/{cfg.steps} · loss {s.loss:.3f} · {tok_s:,.0f} tokens/s · {kb:,.0f} kB/step"
    if ev.kind == "eval":
        return f"step {ev.step}/{cfg.steps} · held-out perplexity {ev.perplexity:,.2f}"
    if ev.kind == "stopped":
        return f"Stopped at step {ev.step}: checkpoint saved in `{ev.path}`."
    return f"Done: adapter saved in `{ev.path}` (PEFT format). The generation tab now uses it."


def finetune_tab(engine, adapter_switch: gr.Dropdown, data_dir: str | None = None) -> None:
    """The tab's components and callbacks; `adapter_switch` is the generation tab's adapter choice (this browser
    tab's), turned to the run's adapter when it ends. It trains on uploads, or on text under `data_dir` (the
    app's --data-dir) and nowhere else: whoever reaches the app must not make it read the machine's files."""
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Training text (.txt files)", file_count="multiple", file_types=[".txt"])
            path = gr.Textbox(
                label=f"…or a file or folder in {data_dir}"
                if data_dir
                else "…or a path (start the app with --data-dir)",
                value="",
                interactive=data_dir is not None,
            )
            with gr.Row():
                steps = gr.Number(value=200, precision=0, label="Steps")
                batch = gr.Number(value=8, precision=0, label="Batch size")
                block = gr.Number(value=128, precision=0, label="Block size")
            with gr.Row():
                rank = gr.Number(value=8, precision=0, label="LoRA rank")
                lr = gr.Number(value=2e-4, label="Learning rate")
                every = gr.Number(value=50, precision=0, label="Evaluate every (steps)")
            client_train = gr.Dropdown(list(CLIENT_TRAIN), value="none", label="Client blocks")
            out = gr.Textbox(label="Save the adapter in", value="adapters/app-run")
            with gr.Row():
                start = gr.Button("Start fine-tuning", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            status = gr.Markdown("_Choose some text and press Start._")
        with gr.Column(scale=3):
            loss_plot = gr.Plot(label="Loss")
            ppl_plot = gr.Plot(label="Held-out perplexity")
    state = gr.State(None)

    on_start = _start_handler(engine, data_dir)

    def on_stop(bg):
        if bg is not None:
            bg.stop()
        return "Stopping after the current step …"

    inputs = [upload, path, steps, batch, block, rank, lr, every, client_train, out]
    start.click(on_start, inputs, [status, loss_plot, ppl_plot, state, adapter_switch])
    stop.click(on_stop, [state], [status])


def _start_handler(engine, data_dir: str | None):
    """The Start button's handler: a run in the background, its status and curves as it goes, and at its end the
    adapter switch turned to the run's adapter."""

    def on_start(files, data_path, n, b, t, r, rate, k, ct, out_dir):
        data = _data_path(files, data_path, data_dir)
        cfg = TrainConfig(
            data=data,
            steps=int(n),
            batch_size=int(b),
            block_size=int(t),
            lora_rank=int(r),
            lr=float(rate),
            eval_every=int(k),
            client_train=ct,
            out=_fresh(out_dir),
        )
        bg = BackgroundRun(engine, cfg)
        losses, evals = [], []
        yield f"Starting: {cfg.steps} steps on `{data}` …", *curves(losses, evals), bg, gr.update()
        try:
            for ev in bg.events():
                if ev.kind == "step":
                    losses.append([ev.step, ev.stats.loss])
                elif ev.kind == "eval":
                    evals.append([ev.step, ev.eval_loss])
                elif ev.kind == "done":
                    name = Path(ev.path).name
                    engine.add_adapter(name, ev.path)
                    switch = gr.update(choices=ui.adapter_choices(engine), value=name, interactive=True)
                    yield _status(ev, cfg), *curves(losses, evals), bg, switch
                    return
                if ev.kind != "checkpoint":
                    yield _status(ev, cfg), *curves(losses, evals), bg, gr.update()
        except (SplitError, ValueError) as e:
            logger.warning("fine-tuning failed: %s", e)
            yield f"⚠️ {e}", *curves(losses, evals), bg, gr.update()

    return on_start


def _data_path(files, typed: str, data_dir: str | None = None) -> str:
    """What to train on: the uploads, else `typed` resolved inside `data_dir` (refused anywhere else)."""
    if files:
        paths = [Path(f if isinstance(f, str) else f.name) for f in files]
        if len(paths) == 1:
            return str(paths[0])
        folder = Path(paths[0]).parent / "training-text"  # several uploads: one folder of them
        folder.mkdir(exist_ok=True)
        for p in paths:
            (folder / p.name).write_bytes(p.read_bytes())
        return str(folder)
    if not typed.strip():
        raise gr.Error("Upload some .txt files or give a path to train on.")
    return str(inside(typed.strip(), data_dir))


def inside(typed: str, data_dir: str | None) -> Path:
    """`typed` (relative to `data_dir`, or absolute) as a path inside `data_dir`, links resolved; anything else is
    refused."""
    if not data_dir:
        raise gr.Error("This app reads uploads only: start it with --data-dir FOLDER to train on files there.")
    root = Path(data_dir).expanduser().resolve()
    path = (root / Path(typed).expanduser()).resolve()
    if path != root and root not in path.parents:
        raise gr.Error(f"'{typed}' is outside the data folder {root}: give a file or folder in it, or upload.")
    if not path.exists():
        raise gr.Error(f"'{typed}' does not exist in the data folder {root}.")
    return path


def _fresh(out: str) -> str:
    """The output directory, or a numbered sibling when it already holds a run."""
    base, n = Path(out), 1
    candidate = base
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)
