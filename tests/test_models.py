"""Model specs, presets, the bundled tokenizer, fingerprints, reload from disk, and CLI errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from splitcore import models
from splitcore.checkpoint import bundled_tokenizer
from splitcore.errors import ModelSpecError
from splitcore.fingerprint import model_fingerprint
from splitcore.models import resolve_model, resolve_with_fallback
from splitcore.parts import Split
from tests.conftest import ROOT, load_hf_model, subprocess_env


def test_bundled_tokenizer_is_real_gpt2():
    tok = bundled_tokenizer()
    assert len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256


def test_random_preset_has_real_shape_and_tokenizer(tiny):
    assert tiny.is_random and tiny.config.n_layer == 12 and tiny.config.vocab_size == 50257
    assert (tiny.path / "model.safetensors").exists() and (tiny.path / "tokenizer.json").exists()


def test_random_preset_identical_in_every_process(tiny, tmp_path):
    """Another process, another directory: the same seed gives the same weights, hence the same fingerprint."""
    code = (
        "import sys; from splitcore.models import resolve_model; from splitcore.fingerprint import "
        "model_fingerprint; from splitcore.parts import Split; "
        f"m = resolve_model('random:tiny', r'{tmp_path}'); print(model_fingerprint(m, Split(2, 10)).digest)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, check=True
    ).stdout.strip()
    assert out == model_fingerprint(tiny, Split(2, 10)).digest


def test_saved_model_reloads_with_same_fingerprint_and_outputs(tiny, full_model, tmp_path):
    full_model.save_pretrained(tmp_path / "copy")
    copy = resolve_model(str(tmp_path / "copy"), tmp_path)
    assert not copy.is_random
    a, b = model_fingerprint(tiny, Split(2, 10)), model_fingerprint(copy, Split(2, 10))
    assert a.weights == b.weights and a.digest == b.digest
    ids = torch.tensor([[15496, 995, 11]])
    with torch.inference_mode():
        assert torch.equal(full_model(ids).logits, load_hf_model(copy.path)(ids).logits)


def test_fingerprint_names_what_differs(tiny, tmp_path):
    a = model_fingerprint(tiny, Split(2, 10))
    b = model_fingerprint(tiny, Split(3, 10))
    assert a.digest != b.digest
    assert a.differences(b) == ["split points (2,10 vs 3,10)"]
    m = load_hf_model(tiny.path)
    with torch.no_grad():
        m.transformer.h[5].mlp.c_fc.bias.add_(1.0)
    m.save_pretrained(tmp_path / "changed")
    c = model_fingerprint(resolve_model(str(tmp_path / "changed"), tmp_path), Split(2, 10))
    assert [d.split(" ")[0] for d in a.differences(c)] == ["weights"]


def test_bad_specs_raise_readable_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model("./no/such/dir", tmp_path)
    with pytest.raises(ModelSpecError, match="unknown random preset"):
        resolve_model("random:gpt5", tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelSpecError, match="'llama' model; only the GPT-2 architecture"):
        resolve_model(str(tmp_path / "llama"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def _no_network(**kwargs):
    raise OSError("network is unreachable")


def test_download_failure_is_readable_and_default_falls_back_loudly(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    with pytest.raises(ModelSpecError, match="could not download 'gpt2-medium'"):
        resolve_model("gpt2-medium", tmp_path)
    assert not any(p.name.startswith(".dl-") for p in tmp_path.iterdir())  # no half-downloaded leftovers
    with pytest.raises(ModelSpecError):
        resolve_with_fallback("gpt2-medium", tmp_path, fallback_random=True)  # only the default falls back
    monkeypatch.setitem(models.RANDOM_PRESETS, "gpt2", models.RANDOM_PRESETS["tiny"])  # keep the test small
    with caplog.at_level(logging.WARNING):
        m = resolve_with_fallback("gpt2", tmp_path, fallback_random=True)
    assert m.is_random and m.spec == "random:gpt2"
    assert "FALLING BACK TO random:gpt2" in caplog.text


def test_cached_hub_model_loads_offline(tiny, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    shutil.copytree(tiny.path, tmp_path / "gpt2")  # as a finished download would leave it
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network)
    m = resolve_model("gpt2", tmp_path)
    assert m.path == tmp_path / "gpt2" and not m.is_random


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,msg",
    [
        (("baseline", "generate", "hi", "--model", "./missing"), "does not exist"),
        (("baseline", "generate", "hi", "--model", "random:nope"), "unknown random preset"),
        (("client", "generate", "hi", "--model", "random:tiny", "--split", "0,10", "--local-trunk"), "0 < s1 < s2"),
        (("client", "generate", "", "--model", "random:tiny", "--local-trunk"), "prompt is empty"),
        (("baseline", "generate", "hi", "--model", "random:tiny", "--max-tokens", "2000"), "context of 1024"),
    ],
)
def test_cli_user_mistakes_give_one_line_and_exit_2(args, msg):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and msg in lines[-1]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_json_same_tokens_split_and_full():
    common = (
        "generate",
        "The meaning of life is",
        "--model",
        "random:tiny",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    )
    full = json.loads(_cli("baseline", *common).stdout)
    split = json.loads(_cli("client", *common, "--local-trunk").stdout)
    assert full["token_ids"] == split["token_ids"] and len(full["token_ids"]) == 12
    assert full["text"] == split["text"]
    assert split["prompt_token_ids"] == full["prompt_token_ids"]
    for key in ("ttft_ms", "per_token_ms", "tokens_per_s"):
        assert key in full["stats"] and key in split["stats"]
    assert len(split["stats"]["server_ms"]) == 12 and split["random_weights"] is True


@pytest.mark.slow
def test_cli_streams_text_without_json():
    r = _cli("baseline", "generate", "Once upon", "--model", "random:tiny", "--max-tokens", "5", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("Once upon") and len(r.stdout) > len("Once upon\n")
