"""The OpenAI-compatible API, through the official `openai` package against a live server on 127.0.0.1: the split
client (random:tiny) behind uvicorn, its trunk on a real gRPC server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import ROOT, TINY, free_port, start_tiny_server, subprocess_env, tiny_split_engine, wait_for

from frontend.api import API, CHAT_STOP, chat_prompt, model_card
from splitcore.sampling import SamplingParams

KEY = "sk-test-key"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def live(models_dir, tiny):
    """(trunk server, engine, base url): the API on a free port with --api-key KEY."""
    import uvicorn

    srv = start_tiny_server(models_dir, max_sessions=16, grace_s=1)
    target = f"127.0.0.1:{srv.port}"
    engine = tiny_split_engine(models_dir, target)
    api = API(engine, model_card(engine), api_key=KEY)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    wait_for(lambda: web.started, 20, "the API server started")
    yield srv, engine, f"http://127.0.0.1:{port}/v1"
    web.should_exit = True
    thread.join(10)
    engine.close()
    srv.stop(1)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[2], api_key=KEY, max_retries=0, timeout=60)


def greedy(engine, prompt: str, n: int) -> str:
    return engine.run(prompt, n, SamplingParams(0.0, 0)).text


def test_models_lists_the_model_and_its_split(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == [TINY]
    extra = models[0].model_extra
    assert extra["split"] == "2,10" and extra["context_length"] == 1024 and live[1].trunk_label in extra["trunk"]
    assert client.models.retrieve(TINY).id == TINY


def test_greedy_completion_equals_the_cli(client, live):
    srv, engine, _ = live
    r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=0)
    cmd = [sys.executable, "-m", "client", "generate", PROMPT, "--model", TINY, "--device", "cpu"]
    cmd += ["--server", f"127.0.0.1:{srv.port}", "--temperature", "0", "--max-tokens", "12", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    cli = json.loads(out.stdout)
    assert r.choices[0].text == cli["text"] and len(cli["token_ids"]) == 12
    assert r.choices[0].finish_reason == "length"
    ids = engine.encode(PROMPT)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    t = r.model_extra["timings"]
    assert t["generated_tokens"] == 12 and t["ttft_ms"] > 0 and t["server_ms"] > 0 and t["network_ms"] >= 0


def test_streamed_completion_equals_the_whole(client):
    whole = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model=TINY, prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices  # include_usage: one more chunk
    ending = [c for c in chunks if c.choices][-1]
    assert ending.choices[0].finish_reason == "length" and ending.model_extra["timings"]["generated_tokens"] == 10
    plain = list(client.completions.create(model=TINY, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in plain) and plain[-1].usage is None  # no usage chunk unless asked


def test_echo_puts_the_prompt_first(client):
    r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_chat_completion_follows_the_template(client, live):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=TINY, messages=messages, max_tokens=16, temperature=0)
    prompt = "System: You are terse.\nUser: Say hello.\nAssistant:"
    from frontend.api import ChatMessage

    assert chat_prompt([ChatMessage(**m) for m in messages]) == prompt
    expected = greedy(live[1], prompt, 16).split(CHAT_STOP)[0].lstrip()
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    streamed = list(
        client.chat.completions.create(model=TINY, messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed)
        return r.choices[0].text

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c


def test_stop_sequence_cuts_the_text(client):
    full = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=TINY, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[: full.find(stop)]


def test_logprobs_are_the_models(client, live, full_model, tokenizer):
    r = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = live[1].encode(PROMPT) + live[1].encode(r.choices[0].text)
    with torch.no_grad():
        ref = torch.log_softmax(full_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    n = len(live[1].encode(PROMPT))
    assert len(lp.token_logprobs) == 6 and len(lp.top_logprobs) == 6
    for i, got in enumerate(lp.token_logprobs):
        row = ref[n + i - 1]
        assert abs(got - float(row.max())) < 1e-4  # greedy: the most likely token
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    chat = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6) for c in content)


def test_concurrent_requests_get_their_solo_text(client, live):
    prompts = [f"{PROMPT} number {i}" for i in range(4)]
    solo = {p: greedy(live[1], p, 10) for p in prompts}

    def one(p):
        stream = client.completions.create(model=TINY, prompt=p, max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(prompts, pool.map(one, prompts), strict=True))
    assert got == solo
    wait_for(lambda: live[0].sessions.active() == 0, what="sessions closed")


def test_a_client_gone_mid_stream_frees_its_trunk_session(client, live):
    srv = live[0]
    wait_for(lambda: srv.sessions.active() == 0, what="no sessions before")
    stream = client.completions.create(model=TINY, prompt=PROMPT, max_tokens=900, temperature=0, stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert srv.sessions.active() == 1  # the generation holds its session
    stream.close()
    wait_for(lambda: srv.sessions.active() == 0, 15, "the trunk session freed after the client left")


def _status(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body


@pytest.mark.parametrize(
    "kwargs, status, param, code",
    [
        ({"model": "gpt-4", "prompt": PROMPT}, 404, "model", "model_not_found"),
        ({"model": TINY, "prompt": PROMPT, "max_tokens": 2000}, 400, "max_tokens", "context_length_exceeded"),
        ({"model": TINY, "prompt": "word " * 1100}, 400, "prompt", "context_length_exceeded"),
        ({"model": TINY, "prompt": PROMPT, "temperature": "hot"}, 400, "temperature", None),
        ({"model": TINY, "prompt": PROMPT, "n": 2}, 400, "n", None),
        ({"model": TINY, "prompt": PROMPT, "logprobs": 9}, 400, "logprobs", None),
        ({"model": TINY, "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"model": TINY, "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", None),
        ({"model": TINY, "prompt": ""}, 400, "prompt", None),
        ({"model": TINY, "prompt": [PROMPT, ""]}, 400, "prompt", None),
        ({"model": TINY, "prompt": [[464, 2068], [10**9]]}, 400, "prompt", None),
    ],
)
def test_bad_completion_requests_get_openai_errors(client, live, kwargs, status, param, code):
    got, body = _status(lambda: client.completions.create(**kwargs))
    assert got == status and body["param"] == param and body["code"] == code and body["message"], body
    assert live[0].sessions.active() == 0  # nothing was opened on the trunk


@pytest.mark.parametrize(
    "messages, param",
    [([], "messages"), ([{"role": "wizard", "content": "hi"}], "messages.0.role"), (None, "messages")],
)
def test_bad_chat_requests_get_openai_errors(live, messages, param):
    body = {"model": TINY, "max_tokens": 2} | ({"messages": messages} if messages is not None else {})
    r = httpx.post(f"{live[2]}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_missing_prompt_and_bad_json(live):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{live[2]}/completions", json={"model": TINY}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{live[2]}/completions", content=b"{not json", headers=auth | {"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_api_key_is_required(live, client):
    wrong = openai.OpenAI(base_url=live[2], api_key="sk-wrong", max_retries=0)
    got, body = _status(lambda: wrong.completions.create(model=TINY, prompt=PROMPT, max_tokens=2))
    assert got == 401 and body["code"] == "invalid_api_key"
    assert httpx.get(f"{live[2]}/models").status_code == 401
    assert client.models.list().data  # the right key works


def test_trunk_down_is_503_and_the_api_keeps_serving(models_dir, tiny):
    """An engine whose trunk is gone: the request fails with 503 in OpenAI's shape, and the next one too (no
    crash)."""
    from fastapi.testclient import TestClient

    srv = start_tiny_server(models_dir)
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}", connect_timeout_s=1.0)
    srv.stop(0)
    try:
        with TestClient(API(engine, model_card(engine)).app) as web:
            for stream in (False, True):
                r = web.post(
                    "/v1/completions", json={"model": TINY, "prompt": PROMPT, "max_tokens": 2, "stream": stream}
                )
                assert r.status_code == 503 and r.json()["error"]["code"] == "trunk_unavailable", r.text
    finally:
        engine.close()


def test_trunk_without_a_free_slot_is_503_busy(models_dir, tiny):
    """Every KV slot of the trunk taken: 503 with code trunk_busy, naming the limit; once one is free, it serves."""
    from fastapi.testclient import TestClient

    srv = start_tiny_server(models_dir, kv_slots=1, grace_s=0.5)
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}")
    holder = engine.new_stepper(16)
    holder.step(torch.tensor([engine.encode(PROMPT)]))  # takes the only slot
    try:
        with TestClient(API(engine, model_card(engine)).app) as web:
            body = {"model": TINY, "prompt": PROMPT, "max_tokens": 2}
            r = web.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "trunk_busy", r.text
            assert "--kv-slots, is 1" in r.json()["error"]["message"]
            holder.close()
            wait_for(lambda: srv.runtime.used_slots() == 0, what="the slot given back")
            assert web.post("/v1/completions", json=body).status_code == 200
    finally:
        holder.close()
        engine.close()
        srv.stop(0.5)


def test_api_command_line_mistake_is_one_line():
    cmd = [sys.executable, "-m", "client", "api", "--model", TINY, "--server", "127.0.0.1:1", "--device", "cpu"]
    out = subprocess.run(
        cmd + ["--connect-timeout", "1"], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


# --- OpenAI's completion request in full: batches of prompts, echo with log-probabilities, max_tokens 0 ---------
PROMPTS = ["The quick brown fox", "Once upon a time", "Split learning keeps", "Hidden states cross"]


@pytest.mark.parametrize("form", ["strings", "token lists"])
def test_a_batch_of_four_prompts_gives_four_choices_each_as_alone(client, live, form):
    engine = live[1]
    prompts = PROMPTS if form == "strings" else [engine.encode(p) for p in PROMPTS]
    r = client.completions.create(model=TINY, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, p in zip(r.choices, prompts, strict=True):
        alone = client.completions.create(model=TINY, prompt=p, max_tokens=8, temperature=0).choices[0]
        assert c.text == alone.text and c.finish_reason == alone.finish_reason
    assert r.usage.completion_tokens == 32
    assert r.usage.prompt_tokens == sum(len(engine.encode(p)) for p in PROMPTS)
    one = client.completions.create(model=TINY, prompt=engine.encode(PROMPTS[0]), max_tokens=8, temperature=0)
    assert one.choices[0].text == r.choices[0].text  # a single list of token ids


def test_a_streamed_batch_gives_each_choice_its_own_text(client):
    whole = client.completions.create(model=TINY, prompt=PROMPTS, max_tokens=6, temperature=0)
    texts = ["", "", "", ""]
    for chunk in client.completions.create(model=TINY, prompt=PROMPTS, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


def _hf_prompt_logprobs(full_model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(full_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_gives_the_prompts_log_probabilities_as_hf(client, live, full_model, max_tokens):
    engine = live[1]
    ids = engine.encode(PROMPTS[0])
    r = client.completions.create(
        model=TINY, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPTS[0]) and len(lp.tokens) == len(ids) + max_tokens
    assert "".join(lp.tokens[: len(ids)]) == PROMPTS[0] and lp.text_offset[: len(ids)][0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    want = _hf_prompt_logprobs(full_model, ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1 : len(ids)], want, strict=True)) < 1e-4
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert len(top) == 2 and max(top.values()) >= tok_lp - 1e-6
    if max_tokens == 0:
        assert c.text == PROMPTS[0] and r.usage.completion_tokens == 0 and c.finish_reason == "length"
    else:  # the completion's own follow, as without echo
        alone = client.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
        assert lp.token_logprobs[len(ids) :] == alone.choices[0].logprobs.token_logprobs
    wait_for(lambda: live[0].sessions.active() == 0, what="the generations' trunk sessions closed")


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(live):
    """A schema-driven fuzzer against /openapi.json: every answer is a declared status with its declared body."""
    import shutil

    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    cmd = [st, "run", live[2].removesuffix("/v1") + "/openapi.json", "-H", f"Authorization: Bearer {KEY}"]
    cmd += ["--checks", checks, "--max-examples", "25", "--seed", "20261203", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(out.stdout[-1500:])
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
    wait_for(lambda: live[0].sessions.active() == 0, 30, "no session left open")


def test_the_requests_user_keys_its_generation(client, live, monkeypatch):
    """The request's `user` reaches the engine's stepper (the split client keys its noise by it: one secret per
    user, tests/test_defence.py); a user name too long is a 400."""
    engine, seen = live[1], []
    real = engine.new_stepper

    def spy(*args, **kwargs):
        seen.append(kwargs.get("user", args[4] if len(args) > 4 else ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "new_stepper", spy)
    client.completions.create(model=live[1].model.spec, prompt="Hello", max_tokens=2, temperature=0, user="alice")
    client.chat.completions.create(
        model=live[1].model.spec, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, user="bob"
    )
    client.completions.create(model=live[1].model.spec, prompt="Hello", max_tokens=2, temperature=0)
    assert seen == ["alice", "bob", ""]
    with pytest.raises(openai.BadRequestError, match="user takes at most 256 characters"):
        client.completions.create(model=live[1].model.spec, prompt="Hello", max_tokens=2, user="x" * 257)
