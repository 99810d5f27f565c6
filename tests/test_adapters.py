"""Generating with a fine-tuned adapter: over the split (the trunk's share uploaded at session open), unsplit,
and with HF + PEFT, all alike; the fingerprint covers the adapter; bad uploads are refused."""

from __future__ import annotations

import grpc
import pytest
import torch
from safetensors.torch import load_file

from client.split_training import Run, SplitTrainer, TrainConfig
from splitcomm.codec import decode_named, encode
from splitcomm.errors import TrunkError
from splitcomm.proto import trunk_pb2 as pb
from splitcore.engine import FullEngine
from splitcore.errors import InvalidInput
from splitcore.fingerprint import model_fingerprint
from splitcore.lora import CLIENT_WEIGHTS, adapter_digest
from splitcore.sampling import SamplingParams
from splitcore.training import TextData
from tests.conftest import CORPUS, ROOT, load_hf_model, start_tiny_server, tiny_split_engine, wait_for

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The history of natural language processing"


@pytest.fixture(scope="module")
def served(models_dir, tiny):
    srv = start_tiny_server(models_dir, max_sessions=8, grace_s=0.5)
    yield srv, f"127.0.0.1:{srv.port}"
    srv.stop(0.5)


@pytest.fixture(scope="module", params=["lora", "full"])
def adapter_dir(models_dir, served, tmp_path_factory, request):
    """The trunk's adapter over the split, and the client's parts with adapters of their own (lora) or trained
    in full (full: client_model.safetensors beside the adapter), trained enough to change greedy text."""
    out = tmp_path_factory.mktemp(f"adapter-{request.param}")
    engine = tiny_split_engine(models_dir, served[1])
    lr = 3e-2 if request.param == "lora" else 3e-3
    cfg = TrainConfig(steps=8, eval_every=0, eval_batches=1, batch_size=4, block_size=32, lora_rank=4, lr=lr)
    cfg.out, cfg.client_train = str(out), request.param
    data = TextData.from_path(CORPUS, engine.encode, block=32)
    trainer = SplitTrainer(engine, cfg.lora(), request.param)
    list(Run(trainer, data, cfg, "random:tiny"))
    trainer.close()
    engine.close()
    return out


@pytest.mark.slow
def test_split_with_adapter_generates_as_full_model_and_hf_peft(models_dir, tiny, served, adapter_dir):
    from peft import PeftModel

    split = tiny_split_engine(models_dir, served[1], adapter=str(adapter_dir))
    full = FullEngine(tiny, torch.device("cpu"), torch.float32, adapter=str(adapter_dir))
    got = split.run(PROMPT, 30, GREEDY).token_ids
    assert got == full.run(PROMPT, 30, GREEDY).token_ids

    ids = full.encode(PROMPT)
    base = load_hf_model(tiny.path)
    client = adapter_dir / CLIENT_WEIGHTS  # HF's names and layout: a plain load_state_dict takes them
    assert client.is_file() == (adapter_dir.name.startswith("adapter-full"))
    if client.is_file():
        assert base.load_state_dict(load_file(str(client)), strict=False).unexpected_keys == []
    hf = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    want = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, pad_token_id=50256)[0, len(ids) :]
    assert got == want.tolist()

    base = split.run(PROMPT, 30, GREEDY, adapter=split.BASE).token_ids  # a generation's own choice: the base model
    assert base == full.run(PROMPT, 30, GREEDY, adapter=full.BASE).token_ids and base != got
    split.close()
    wait_for(lambda: served[0].sessions.active() == 0, what="sessions freed")


@torch.inference_mode()
def test_split_with_adapter_logits_equal_full_with_adapter(models_dir, tiny, served, adapter_dir):
    split = tiny_split_engine(models_dir, served[1], adapter=str(adapter_dir))
    full = FullEngine(tiny, torch.device("cpu"), torch.float32, adapter=str(adapter_dir))
    a, b = split.new_stepper(60), full.new_stepper(60)
    chunk, worst = torch.tensor([split.encode(PROMPT)]), 0.0
    for _ in range(20):
        la, lb = a.step(chunk).logits, b.step(chunk).logits
        worst = max(worst, float((la - lb).abs().max()))
        chunk = torch.tensor([[int(lb.argmax())]])
    a.close()
    b.close()
    split.close()
    assert worst < 1e-5


def test_adapter_digest_is_in_the_session_fingerprint(models_dir, served, adapter_dir):
    split = tiny_split_engine(models_dir, served[1], adapter=str(adapter_dir))
    fp = split.adapter.session_fingerprint
    adapted = range(12) if adapter_dir.name.startswith("adapter-lora") else range(2, 10)  # full: no LoRA here
    assert fp.adapter and fp.digest != split.fingerprint.digest and split.adapter.layers == list(adapted)
    lora, state = split.adapter.trunk_open
    assert {int(n.name.split(".")[1]) for n in state.weights} == set(range(2, 10))  # only the trunk's share goes

    client = split.trunk_client
    tampered = pb.AdapterState()
    tampered.CopyFrom(state)
    tampered.weights[0].tensor.CopyFrom(encode(torch.zeros(list(tampered.weights[0].tensor.shape))))
    with pytest.raises(TrunkError, match="adapter") as e:
        client.session(fp, 20, adapter=(lora, tampered)).step(torch.zeros(1, 2, 64))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION

    outside = pb.AdapterState()
    outside.CopyFrom(state)
    outside.weights[0].name = outside.weights[0].name.replace("h.2.", "h.0.", 1)
    claim = model_fingerprint(split.model, split.split).with_adapter(adapter_digest(decode_named(outside.weights)))
    claim_pb = pb.Fingerprint(**claim.to_dict(), digest=claim.digest)  # an honest digest of a wrong upload
    with pytest.raises(TrunkError, match="blocks outside the trunk") as e:
        client.session(claim_pb, 20, adapter=(lora, outside)).step(torch.zeros(1, 2, 64))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    split.close()


def test_stateless_with_an_adapter_on_the_trunk_is_a_clear_error(models_dir, served, adapter_dir):
    split = tiny_split_engine(models_dir, served[1], adapter=str(adapter_dir), stateless=True)
    with pytest.raises(InvalidInput, match="stateless mode does not carry an adapter"):
        split.run(PROMPT, 3, GREEDY)
    split.close()


def test_bad_adapter_path_is_one_line(models_dir, served, tmp_path):
    with pytest.raises(InvalidInput, match="is not a PEFT adapter"):
        tiny_split_engine(models_dir, served[1], adapter=str(tmp_path))


# --- adapters served as models -------------------------------------------------------------------------------
def _train(models_dir, target: str, out, lr: float, text: str) -> None:
    engine = tiny_split_engine(models_dir, target)
    cfg = TrainConfig(steps=8, eval_every=0, eval_batches=1, batch_size=4, block_size=32, lora_rank=4, lr=lr)
    cfg.out, cfg.client_train = str(out), "lora"
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.txt").write_text(text * 40)
    trainer = SplitTrainer(engine, cfg.lora(), "lora")
    list(Run(trainer, TextData.from_path(out.parent / f"{out.name}.txt", engine.encode, block=32), cfg, "random:tiny"))
    trainer.close()
    engine.close()


@pytest.fixture(scope="module")
def two_adapters(models_dir, served, tmp_path_factory):
    """Two adapters trained on different text, each enough to change greedy text."""
    d = tmp_path_factory.mktemp("two")
    _train(models_dir, served[1], d / "kjv", 3e-2, "In the beginning God created the heaven and the earth. ")
    _train(models_dir, served[1], d / "code", 5e-2, "def forward(self, x): return self.head(self.blocks(x))\n")
    return {"kjv": d / "kjv", "code": d / "code"}


def test_adapters_are_models_of_the_api_chosen_per_request(models_dir, served, two_adapters):
    """Two concurrent requests naming two adapters each get their own adapter's greedy tokens, as the CLI with that
    adapter gives them; the base model's id gets the base model; /v1/models lists all three."""
    import json
    import subprocess
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import uvicorn

    from frontend.api import API, model_card
    from tests.conftest import free_port, subprocess_env

    engine = tiny_split_engine(models_dir, served[1], adapter=tuple(f"{n}={p}" for n, p in two_adapters.items()))
    api = API(engine, model_card(engine))
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    wait_for(lambda: web.started, 20, "the API server started")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["random:tiny", "kjv", "code"]
        models = ["kjv", "code", "random:tiny"]

        def complete(model: str) -> str:
            return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            got = dict(zip(models, pool.map(complete, models), strict=True))
        for name, path in [*two_adapters.items(), ("random:tiny", None)]:
            cmd = [sys.executable, "-m", "client", "generate", PROMPT, "--model", "random:tiny", "--device", "cpu"]
            cmd += ["--server", served[1], "--temperature", "0", "--max-tokens", "16", "--json"]
            cmd += ["--adapter", str(path)] if path else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=180)
            assert out.returncode == 0, out.stderr[-2000:]
            assert got[name] == json.loads(out.stdout)["text"], name
        assert len(set(got.values())) == 3  # three different models, three different texts
        with pytest.raises(openai.NotFoundError):
            complete("kjv2")
    finally:
        web.should_exit = True
        engine.close()
