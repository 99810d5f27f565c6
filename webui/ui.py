"""Gradio building blocks shared by the split client app and the full-model baseline app."""

from __future__ import annotations

import logging
import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a private deployment

import gradio as gr  # noqa: E402

from splitcore.engine import Engine, Recorder  # noqa: E402
from splitcore.errors import SplitError  # noqa: E402
from splitcore.models import ResolvedModel  # noqa: E402
from splitcore.sampling import SamplingParams  # noqa: E402
from splitcore.stats import GenerationStats  # noqa: E402
from webui import charts  # noqa: E402

logger = logging.getLogger(__name__)

CSS = """
.header-bar {padding: 6px 12px; border-radius: 8px; background: var(--block-background-fill);}
.random-warning {padding: 6px 12px; border-radius: 8px; background: #fff4e5; color: #8a4b00;
                 border: 1px solid #f5c27a; font-weight: 600;}
.error-banner {color: #b00020; font-weight: 600;}
"""
THEME = gr.themes.Soft(primary_hue="blue")


def header(title: str, model: ResolvedModel, details: str) -> None:
    """Title, the model and where it runs, and a warning when the weights are an offline random preset."""
    gr.Markdown(f"# {title}")
    gr.Markdown(f"**Model:** `{model.spec}` &nbsp;·&nbsp; {details}", elem_classes="header-bar")
    if model.is_random:
        gr.Markdown(
            f"⚠️ Offline random weights (`{model.spec}`): real GPT-2 shape and real timings, but the text is "
            "gibberish. Start with `--model gpt2` on a machine that can download it for real text.",
            elem_classes="random-warning",
        )


@contextmanager
def app_page(title: str, engine: Engine, heading: str, details: str, speculate: str = "none", meter=None):
    """An app's page: the header, then its tabs, the first generating text; yields (demo, history, the generation
    tab's adapter switch) inside the tabs, where the app adds its own."""
    with gr.Blocks(title=title) as demo:
        history = gr.State(charts.History())
        header(heading, engine.model, details)
        with gr.Tabs():
            with gr.Tab("Text generation"):
                adapter_switch = generation_tab(engine, history, speculate, meter)
            yield demo, history, adapter_switch


BASE_CHOICE = "none (the base model)"


def adapter_choices(engine: Engine) -> list[str]:
    return [BASE_CHOICE, *engine.adapters]


def generation_tab(engine: Engine, history: gr.State, speculate: str = "none", meter=None) -> gr.Dropdown:
    """Prompt and settings in, streamed text and a statistics panel out; Stop cancels mid-generation. Returns the
    adapter switch: this browser session's, not the process's (the Fine-tune tab turns it to a run's adapter
    when the run ends). `speculate`: the Speculative decoding
    switch's setting at start (a draft:SPEC joins its choices). `meter` (client/privacy.py): after each
    generation, show the prompt as the trunk's attacker reads it from what was sent."""
    sources = list(engine.draft_sources) + ([speculate] if speculate not in engine.draft_sources else [])
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=4, value="The history of the Roman Empire")
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            output = gr.Textbox(label="Output", lines=10, interactive=False)
            status = gr.Markdown(elem_classes="error-banner")
        with gr.Column(scale=2):
            settings = _settings(engine, sources, speculate)
            max_tokens, temperature, top_k, top_p, seed, speculation, adapter_switch = settings
            stats_panel = gr.Markdown("_Statistics appear here after a run._")
    privacy_share = gr.Markdown(visible=meter is not None, elem_id="privacy-share")
    privacy_read = gr.HighlightedText(
        label="What the trunk could read: your prompt, as the attacker reads it from the hidden states sent",
        color_map={"read": "#f4a3a3", "wrong": "#d9ead3"},
        show_legend=True,
        combine_adjacent=False,
        visible=meter is not None,
        elem_id="privacy-read",
    )

    on_generate = _generate_handler(engine, meter)
    inputs = [prompt, max_tokens, temperature, top_k, top_p, seed, speculation, adapter_switch, history]
    outputs = [output, stats_panel, status, history, privacy_share, privacy_read]
    # One endpoint of the app's HTTP API, /generate (gradio_client's predict(..., api_name="/generate")); the
    # prompt box's Enter runs the same function and is left out of the API.
    ev_click = run.click(on_generate, inputs, outputs, api_name="generate")
    ev_submit = prompt.submit(on_generate, inputs, outputs, api_visibility="private")
    stop.click(None, cancels=[ev_click, ev_submit])
    return adapter_switch


def _generate_handler(engine: Engine, meter):
    """The Generate button's handler: streams the text and the statistics, then the privacy meter's reading."""

    def on_generate(prompt_text, n, temp, k, p, seed_value, source, adapter, hist):
        stats = GenerationStats()
        text, notice = "", ""
        seed_int = int(seed_value) if seed_value is not None and seed_value >= 0 else None
        params = SamplingParams(float(temp), int(k), float(p), seed_int)
        ids = engine.encode(prompt_text or "")
        tap = None if meter is None else Recorder()
        name = engine.BASE if adapter in (None, BASE_CHOICE) else adapter
        run = BackgroundStream(engine, ids, int(n), params, stats, source or "none", tap, name)
        keep = gr.update()  # the privacy panel, unchanged until the generation is done
        try:
            yield text, charts.stats_markdown(stats, running=True), "", hist, keep, keep
            for kind, value in run.events():
                if kind == "token":
                    text += value.text
                elif kind == "notice":  # the trunk was lost or came back: say so while the tokens wait
                    notice = f"⚠️ {value}"
                yield text, charts.stats_markdown(stats, running=True), notice, hist, keep, keep
        except SplitError as e:
            logger.warning("generation failed: %s", e)
            yield text, charts.stats_markdown(stats), f"⚠️ {e}", hist, keep, keep
            return
        finally:
            run.stop()
            if stats.tokens:
                hist.add(prompt_text, stats)
                logger.info(
                    "generated %d tokens, ttft %.1f ms, %.1f tokens/s",
                    len(stats.tokens),
                    stats.ttft_ms,
                    stats.tokens_per_s,
                )
        share, read = keep, keep
        if tap is not None and tap.prefill is not None:
            share, read = _meter_panel(engine, meter.read(ids, tap.prefill, name), len(ids))
        yield text, charts.stats_markdown(stats), notice, hist, share, read

    return on_generate


def _settings(engine: Engine, sources: list[str], speculate: str) -> tuple:
    """The generation settings: max tokens, temperature, top-k, top-p, seed, speculation and the adapter switch."""
    return (
        gr.Slider(1, 1000, value=50, step=1, label="Max tokens"),
        gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0, 500, value=50, step=1, label="Top-k (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p"),
        gr.Number(value=-1, precision=0, label="Seed (-1 = random)"),
        gr.Dropdown(
            sources,
            value=speculate,
            label="Speculative decoding",
            info="draft tokens here and verify several per round trip: the same tokens when greedy, the same "
            "distribution when sampling; lookup: from the context; self: the client's own blocks",
        ),
        gr.Dropdown(
            adapter_choices(engine),
            value=engine.default_adapter or BASE_CHOICE,
            label="Adapter",
            interactive=engine.has_adapter,
            info="a LoRA adapter from --adapter or the Fine-tune tab, or none, to compare; for this browser tab alone",
        ),
    )


def _meter_panel(engine: Engine, reading, n: int) -> tuple[str, list]:
    """The privacy meter's line and the prompt as read, after a generation."""
    share = (
        f"**What the trunk could read:** at least {sum(reading.hits)} of {n} prompt tokens "
        f"(**{reading.share:.0%}**), read back by a {reading.attacker}, defence: {engine.noise.label()}"
    )
    return share, reading.segments(engine.decode)


class Background:
    """Long work on a worker thread, so that the UI thread can show what it puts as it comes: `work(put, stopped)`
    runs there; `events()` yields what it put, in order, then re-raises its error; `stop()` sets `stopped`, which
    the work looks at between items."""

    _END = object()

    def __init__(self, work, name: str):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()
        threading.Thread(target=self._run, args=(work,), daemon=True, name=name).start()

    def _run(self, work) -> None:
        try:
            work(self._q.put, self.stopped)
            self._q.put(self._END)
        except BaseException as e:  # handed to the UI thread, which decides what to show
            self._q.put(_Failed(e))

    def events(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def stop(self) -> None:
        self.stopped.set()


@dataclass
class _Failed:
    error: BaseException


class BackgroundStream(Background):
    """One generation on a worker thread, so that the UI can show notices (a lost trunk) while a step waits.

    `events()` yields ("token", TokenEvent) and ("notice", text) and re-raises the generation's error;
    `stop()` ends the generation at the next token (the UI's Stop button, or a closed browser tab)."""

    def __init__(
        self,
        engine: Engine,
        prompt: str | list[int],
        max_new_tokens: int,
        params: SamplingParams,
        stats,
        speculate: str = "none",
        tap=None,
        adapter: str | None = None,
    ):
        def work(put, stopped: threading.Event) -> None:
            how = {"notify": lambda m: put(("notice", m)), "speculate": speculate, "tap": tap, "adapter": adapter}
            stream = engine.stream(prompt, max_new_tokens, params, stats, **how)
            try:
                for event in stream:
                    put(("token", event))
                    if stopped.is_set():
                        break
            finally:
                stream.close()

        super().__init__(work, "generation")


def latency_tab(history: gr.State, every_s: float = 5.0) -> None:
    """This browser session's generations: a summary, the latest one's tokens, a histogram and a timeline."""
    gr.Markdown("Your generations in this browser session (refreshed every few seconds).")
    summary = gr.Dataframe(label="Generations", interactive=False)
    with gr.Row():
        hist_plot = gr.Plot(label="Latency histogram")
        timeline = gr.Plot(label="Latency timeline")
    tokens = gr.Dataframe(label="Latest generation, per token", interactive=False)
    refresh = gr.Button("Refresh")

    def update(hist: charts.History):
        latest = hist.latest
        return (
            charts.history_table(hist),
            charts.latency_histogram(latest),
            charts.latency_timeline(latest),
            charts.token_table(latest),
        )

    outs = [summary, hist_plot, timeline, tokens]
    gr.Timer(every_s).tick(update, [history], outs, show_progress="hidden")
    refresh.click(update, [history], outs)


def launch(demo: gr.Blocks, host: str, port: int, block: bool = True, login: tuple[str, str] | None = None) -> None:
    """Serve an app; `block=False` returns once it is up (tests). `login`: (user, password) of Gradio's own auth.
    GRADIO_SHARE=1 asks for a public link."""
    share = os.environ.get("GRADIO_SHARE", "0").lower() in ("1", "true", "yes")
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        auth=login,
        share=share,
        inbrowser=False,
        theme=THEME,
        css=CSS,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
