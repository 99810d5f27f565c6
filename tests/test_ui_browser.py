"""End to end in a real browser: both Gradio apps, driven by headless Chromium through Playwright."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    CORPUS,
    ROOT,
    TINY,
    free_port,
    start_tiny_replicas,
    start_tiny_server,
    subprocess_env,
    tiny_split_engine,
    wait_for,
)
from webui import ui

PROMPT = "The quick brown fox"
SHOTS = ROOT / "logs"
CHROME_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if not chromium:
        if os.environ.get("GPT2_REQUIRE_BROWSER") == "1":
            pytest.fail("Debian's chromium is required here (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def trunk(models_dir, tiny):
    port = free_port()

    def start():
        return start_tiny_server(models_dir, port=port, grace_s=0.5)

    state = {"server": start(), "start": start, "port": port}
    yield state
    state["server"].stop(0.5)


@pytest.fixture(scope="module")
def client_app(trunk, models_dir):
    from client.app import build_app

    engine = tiny_split_engine(models_dir, f"127.0.0.1:{trunk['port']}", reconnect_s=1.0, connect_timeout_s=2)
    demo, feed = build_app(engine, monitor_interval_s=0.5)
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}"
    feed.stop()
    demo.close()
    engine.close()


@pytest.fixture(scope="module")
def full_app(tiny):
    import torch

    from baseline.app import build_app
    from splitcore.engine import FullEngine

    demo = build_app(FullEngine(tiny, torch.device("cpu"), torch.float32))
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def cli_text(models_dir) -> str:
    """What the command-line client prints for the prompt, greedy: the UIs must show exactly this."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "generate",
            PROMPT,
            "--model",
            TINY,
            "--local-trunk",
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    return json.loads(r.stdout)["text"]


def _set_slider(page, label: str, value: str) -> None:
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(value)
    box.press("Tab")


def _generate(page, prompt: str) -> str:
    page.get_by_label("Prompt").fill(prompt)
    _set_slider(page, "Max tokens", "20")
    _set_slider(page, "Temperature (0 = greedy)", "0")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Done").first.wait_for(timeout=60_000)
    return page.get_by_label("Output").input_value()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"ui_{name}.png"), full_page=True)


def _wait_for_plot(page, timeout_ms=20_000) -> None:
    try:
        page.locator(".js-plotly-plot >> visible=true").first.wait_for(timeout=timeout_ms)
    except Exception:
        _shot(page, "failed_wait_for_plot")
        raise


def test_client_app_generates_like_cli_and_shows_charts(browser, client_app, cli_text):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(client_app)
    page.get_by_text("Offline random weights").first.wait_for(timeout=20_000)  # the header warns
    assert page.get_by_text("random:tiny").first.is_visible()
    text = _generate(page, PROMPT)
    assert text == cli_text and len(text) > 0
    assert page.get_by_text("time to first token").first.is_visible()
    _shot(page, "client_generation")

    page.get_by_role("tab", name="Server monitoring").click()
    _wait_for_plot(page)
    page.get_by_text("blocks 2-9 of 12").first.wait_for(timeout=10_000)
    assert page.locator(".js-plotly-plot").count() >= 2
    time.sleep(2.5)  # a few samples for the history lines
    _shot(page, "client_monitoring")

    page.get_by_role("tab", name="Latency analysis").click()
    page.get_by_role("button", name="Refresh").click()
    _wait_for_plot(page)
    page.get_by_text("Latest generation, per token").first.wait_for()
    assert page.locator(".js-plotly-plot .bars, .js-plotly-plot .trace").count() > 0
    _shot(page, "client_latency")
    page.close()


def test_client_app_speculates_and_reports_it(browser, client_app, cli_text):
    """The Speculative decoding switch: greedy with self-drafts gives the CLI's text; the statistics panel and
    the latency tab report the drafts."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(client_app)
    page.get_by_label("Speculative decoding").click()
    page.get_by_role("option", name="self").click()
    assert _generate(page, PROMPT) == cli_text
    page.get_by_text("drafts accepted").first.wait_for(timeout=10_000)
    _shot(page, "client_speculation")
    page.get_by_role("tab", name="Latency analysis").click()
    page.get_by_role("button", name="Refresh").click()
    page.get_by_text("tokens_per_round_trip").first.wait_for(timeout=10_000)
    page.close()


def test_client_app_survives_trunk_restart(browser, client_app, trunk, cli_text):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(client_app)
    trunk["server"].stop(0.5)
    page.get_by_label("Prompt").fill(PROMPT)
    _set_slider(page, "Temperature (0 = greedy)", "0")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("replaying the session for up to 1 s").first.wait_for(timeout=30_000)  # said while it retries
    banner = page.get_by_text("gave up after 1 s").first  # then the readable end of it
    banner.wait_for(timeout=30_000)
    assert "unreachable" in banner.inner_text()
    assert "Traceback" not in page.content()
    _shot(page, "client_trunk_down")
    trunk["server"] = trunk["start"]()
    assert _generate(page, PROMPT) == cli_text  # works again, no restart of the app
    page.close()


def test_baseline_app_generates_like_cli(browser, full_app, cli_text):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(full_app)
    page.get_by_text("GPT-2 full model").first.wait_for(timeout=20_000)
    assert _generate(page, PROMPT) == cli_text
    _shot(page, "full_generation")
    page.get_by_role("tab", name="Performance").click()
    page.get_by_role("button", name="Refresh").click()
    _wait_for_plot(page)
    _shot(page, "full_performance")
    page.close()


def test_latency_history_is_per_browser_session(browser, full_app):
    a = browser.new_context().new_page()
    b = browser.new_context().new_page()
    for page in (a, b):
        page.goto(full_app)
        page.get_by_text("GPT-2 full model").first.wait_for(timeout=20_000)
    _generate(a, "Only in session A")
    for page, mine in ((a, True), (b, False)):
        page.get_by_role("tab", name="Performance").click()
        page.get_by_role("button", name="Refresh").click()
        _wait_for_plot(page)
        time.sleep(0.5)
        assert (page.get_by_text("Only in session A").count() > 0) == mine
    a.close()
    b.close()


def test_generation_survives_trunk_loss_mid_way_and_says_so(browser, trunk, models_dir, tiny):
    """The trunk dies while tokens stream: the banner says it is reconnecting, and once the trunk is back the same
    generation goes on to the text an uninterrupted run gives (the client replays the prefix)."""
    import torch

    from client.app import build_app
    from splitcore.engine import FullEngine
    from splitcore.sampling import SamplingParams

    n = 900
    expected = FullEngine(tiny, torch.device("cpu"), torch.float32).run(PROMPT, n, SamplingParams(0.0)).text
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{trunk['port']}", reconnect_s=30)
    demo, feed = build_app(engine, monitor_interval_s=0.5)
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"http://127.0.0.1:{port}")
        page.get_by_label("Prompt").fill(PROMPT)
        _set_slider(page, "Max tokens", str(n))
        _set_slider(page, "Temperature (0 = greedy)", "0")
        page.get_by_role("button", name="Generate").click()
        output = page.get_by_label("Output")
        deadline = time.monotonic() + 30
        while not output.input_value() and time.monotonic() < deadline:  # tokens are streaming
            time.sleep(0.02)
        trunk["server"].stop(0)
        page.get_by_text("replaying the session for up to 30 s").first.wait_for(timeout=20_000)
        partial = output.input_value()
        _shot(page, "client_reconnecting")
        trunk["server"] = trunk["start"]()
        page.get_by_text("Done").first.wait_for(timeout=60_000)
        assert page.get_by_text("trunk session back on replica").first.is_visible()
        assert output.input_value() == expected
        assert 0 < len(partial) < len(expected)  # it really was cut off mid-way
    finally:
        page.close()
        feed.stop()
        demo.close()
        engine.close()


def test_finetune_tab_trains_then_generation_uses_the_adapter(browser, trunk, models_dir, tiny, tmp_path):
    """Fine-tune from the app: curves while it trains, then the generation tab generates with the adapter (the
    text the full model with that adapter gives) and, switched off, with the base model again."""
    import torch

    from client.app import build_app
    from splitcore.engine import FullEngine
    from splitcore.sampling import SamplingParams

    engine = tiny_split_engine(models_dir, f"127.0.0.1:{trunk['port']}")
    data_dir = CORPUS.parent
    demo, feed = build_app(engine, monitor_interval_s=0.5, data_dir=str(data_dir))
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    out = tmp_path / "adapter"
    try:
        page.goto(f"http://127.0.0.1:{port}")
        page.get_by_role("tab", name="Fine-tune").click()
        path_box = page.get_by_label(f"…or a file or folder in {data_dir}")
        path_box.fill("../../README.md")  # outside the data folder: refused, nothing read
        page.get_by_role("button", name="Start fine-tuning").click()
        page.get_by_text("is outside the data folder").first.wait_for(timeout=30_000)
        path_box.fill(CORPUS.name)
        for label, value in [("Steps", "6"), ("Batch size", "2"), ("Block size", "32"), ("LoRA rank", "4")]:
            page.get_by_label(label, exact=True).fill(value)
        page.get_by_label("Learning rate", exact=True).fill("0.03")
        page.get_by_label("Evaluate every (steps)", exact=True).fill("3")
        page.get_by_label("Save the adapter in", exact=True).fill(str(out))
        page.get_by_role("button", name="Start fine-tuning").click()
        page.get_by_text("Done: adapter saved in").first.wait_for(timeout=120_000)
        _wait_for_plot(page)
        assert page.locator(".js-plotly-plot").count() >= 2
        _shot(page, "client_finetune")
        assert (out / "adapter_model.safetensors").exists()

        greedy = SamplingParams(0.0)
        full = FullEngine(tiny, torch.device("cpu"), torch.float32, adapter=str(out))
        tuned = full.run(PROMPT, 20, greedy).text
        base = full.run(PROMPT, 20, greedy, adapter=full.BASE).text
        assert tuned != base

        other = browser.new_page(viewport={"width": 1400, "height": 1000})  # another browser tab: its own switch
        other.goto(f"http://127.0.0.1:{port}")
        page.get_by_role("tab", name="Text generation").click()
        switch = page.get_by_label("Adapter", exact=True)
        assert switch.input_value() == "adapter"  # the run's adapter, named after its directory
        assert _generate(page, PROMPT) == tuned
        assert _generate(other, PROMPT) == base  # the other tab's switch is its own: still the base model
        switch.click()
        page.get_by_role("option", name="none (the base model)").click()
        deadline = time.monotonic() + 10
        while switch.input_value() != "none (the base model)" and time.monotonic() < deadline:
            time.sleep(0.05)  # until the switch shows the base model
        page.get_by_role("button", name="Generate").click()  # "Done" is already on the page: wait for the text
        output, deadline = page.get_by_label("Output"), time.monotonic() + 60
        while output.input_value() != base and time.monotonic() < deadline:
            time.sleep(0.1)
        assert output.input_value() == base
        other.close()
    finally:
        page.close()
        feed.stop()
        demo.close()
        engine.close()


@pytest.fixture(scope="module")
def metered_app(models_dir):
    """The client app with the privacy meter, its attacker trained on Genesis (a small budget)."""
    from client.app import build_app
    from client.privacy import InverterConfig, PrivacyMeter

    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's bible-kjv is not installed (scripts/test.sh installs it)")
        pytest.skip("Debian's bible-kjv is not installed")
    engine = tiny_split_engine(models_dir, local_trunk=True)
    cfg = InverterConfig(width=128, layers=2, steps=150, batch_size=8, block_size=32, lr=2e-3)
    meter = PrivacyMeter(engine, "bible:Gen1:1-Gen50:26", models_dir, cfg).prepare()
    demo, _ = build_app(engine, meter=meter)
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", engine, meter
    demo.close()
    engine.close()


def test_client_app_shows_what_the_trunk_could_read(browser, metered_app):
    from splitcore.engine import Recorder
    from splitcore.sampling import SamplingParams

    url, engine, meter = metered_app
    prompt = "And Jesus answered and said unto them, Go and shew John again those things which ye do hear and see"
    rec = Recorder()
    r = engine.run(prompt, 20, SamplingParams(0.0), tap=rec)
    want = meter.read(r.prompt_token_ids, rec.prefill)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    _generate(page, prompt)
    page.get_by_text("What the trunk could read:").first.wait_for(timeout=30_000)
    text = page.locator("#privacy-share").inner_text()
    assert f"{sum(want.hits)} of {len(r.prompt_token_ids)} prompt tokens" in text, text
    assert f"{want.share:.0%}" in text and want.share > 0.3, text
    assert page.locator("#privacy-read").get_by_text("read", exact=True).count() >= 1  # the legend
    _shot(page, "privacy_meter")
    page.close()


def test_monitoring_tab_shows_each_replica(browser, models_dir, tiny):
    """A client given two replicas: the monitoring tab lists both by address, serving, and shows the charts of the
    one picked."""
    from client.app import build_app

    replicas = start_tiny_replicas(models_dir, 2, grace_s=0.5)
    engine = tiny_split_engine(models_dir, replicas.target, connect_timeout_s=2)
    demo, monitors = build_app(engine, monitor_interval_s=0.5)
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}")
        page.get_by_role("tab", name="Server monitoring").click()
        table = page.locator("#replicas")

        def listed() -> bool:
            text = table.inner_text()
            return all(f"127.0.0.1:{s.port}" in text for s in replicas.servers) and text.count("serving") == 2

        wait_for(listed, 30, "both replicas, serving, in the table")
        page.get_by_text("blocks 2-9 of 12").first.wait_for(timeout=10_000)  # the picked replica's line
        _wait_for_plot(page)
        _shot(page, "client_monitoring_replicas")
        page.close()
    finally:
        monitors.stop()
        demo.close()
        engine.close()
        replicas.stop(0.5)


def test_app_started_with_auth_asks_for_the_login(browser, tmp_path):
    """`python -m baseline --auth USER:PASS` (the same flag as the split client's app): a browser sees a login
    form, a wrong password is refused, the right one opens the app, which generates."""
    from tests.conftest import TINY, subprocess_env
    from tests.scripts_support import Script, http_ok

    port = free_port()
    cmd = [sys.executable, "-m", "baseline", "serve", "--model", TINY, "--port", str(port), "--auth", "ada:s3cret-pass"]
    app = Script(cmd, subprocess_env(GPT2_FULL_LOG=str(tmp_path / "full.log")), tmp_path / "out.log")
    try:
        app.wait_until({"the app": lambda: http_ok(f"http://127.0.0.1:{port}/")}, timeout=120)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}")
        page.get_by_label("username").fill("ada")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").first.wait_for(timeout=20_000)
        page.get_by_label("username").fill("ada")
        page.get_by_label("password").fill("s3cret-pass")
        page.get_by_role("button", name="Login").click()
        page.get_by_role("button", name="Generate").wait_for(timeout=30_000)
        _shot(page, "full_login")
        page.get_by_role("spinbutton", name="number input for Max tokens").fill("5")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("tokens in").first.wait_for(timeout=60_000)
        page.close()
    finally:
        app.stop()
