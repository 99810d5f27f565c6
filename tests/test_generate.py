"""The shared generation loop: split vs full vs Hugging Face generate, sampling, stopping, errors, stats."""

from __future__ import annotations

import pytest
import torch

from splitcore.engine import FullEngine
from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.generate import IncrementalDecoder
from splitcore.sampling import SamplingParams, make_generator, sample
from splitcore.stats import GenerationStats, percentile, summarize
from tests.conftest import tiny_split_engine

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hello world, I am a language model", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def full_engine(tiny):
    return FullEngine(tiny, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def local_split(tiny, models_dir):
    return tiny_split_engine(models_dir, local_trunk=True)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_split_matches_hf_generate(full_engine, local_split, full_model, prompt):
    ids = full_engine.encode(prompt)
    want = full_model.generate(
        torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=50256, eos_token_id=None
    )[0, len(ids) :].tolist()
    assert full_engine.run(prompt, 40, GREEDY).token_ids == want
    assert local_split.run(prompt, 40, GREEDY).token_ids == want


def test_seeded_sampling_same_for_split_and_full(full_engine, local_split):
    params = SamplingParams(temperature=1.3, top_k=200, top_p=0.95, seed=7)
    a = full_engine.run(PROMPTS[0], 30, params).token_ids
    b = local_split.run(PROMPTS[0], 30, params).token_ids
    assert a == b
    assert a == full_engine.run(PROMPTS[0], 30, params).token_ids  # reproducible
    other = full_engine.run(PROMPTS[0], 30, SamplingParams(temperature=1.3, top_k=200, top_p=0.95, seed=8))
    assert other.token_ids != a


def test_stream_yields_tokens_as_they_come(local_split):
    stats = GenerationStats()
    events = []
    for e in local_split.stream(PROMPTS[1], 8, GREEDY, stats):
        events.append(e)
        assert len(stats.tokens) == len(events)  # stats fill in as tokens arrive
    assert [e.index for e in events] == list(range(8))
    assert "".join(e.text for e in events) == local_split.decode([e.token_id for e in events])
    d = stats.to_dict()
    assert d["generated_tokens"] == 8 and len(d["per_token_ms"]) == 8 and d["ttft_ms"] > 0
    assert d["tokens_per_s"] > 0 and len(d["server_ms"]) == 8


def test_generation_stops_at_eos(full_engine, monkeypatch):
    # The loop must stop at EOS whatever picked it: the sampler is replaced by one that always returns EOS.
    from splitcore import generate as gen

    monkeypatch.setattr(gen, "sample", lambda logits, params, g: 50256)
    result = full_engine.run("Hi", 10, GREEDY)
    assert result.token_ids == [50256] and result.text == ""


@pytest.mark.parametrize(
    "prompt,max_tokens,params,err,msg",
    [
        ("", 5, GREEDY, InvalidInput, "empty"),
        ("Hi", 0, GREEDY, InvalidInput, "at least 1"),
        ("Hi", 1024, GREEDY, LimitExceeded, "1025 is past the model's context of 1024"),
        ("Hi", 5, SamplingParams(temperature=-1), InvalidInput, "temperature"),
        ("Hi", 5, SamplingParams(top_k=-3), InvalidInput, "top-k"),
        ("Hi", 5, SamplingParams(top_p=0), InvalidInput, "top-p"),
        ("Hi", 5, SamplingParams(top_p=1.5), InvalidInput, "top-p"),
    ],
)
def test_bad_requests_get_clear_errors(local_split, prompt, max_tokens, params, err, msg):
    with pytest.raises(err, match=msg):
        local_split.run(prompt, max_tokens, params)


def test_sampling_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    g = make_generator(0)
    assert sample(logits, SamplingParams(temperature=0), g) == 1
    assert sample(logits, SamplingParams(top_k=0), g) == 1
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=1), g) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=4, top_p=0.01), g) for _ in range(20)} == {1}
    two = {sample(logits, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert two == {1, 3}
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # top-p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    kept = [sample(probs.log(), SamplingParams(temperature=1.0, top_k=4, top_p=0.7), g) for _ in range(400)]
    assert set(kept) == {0, 1} and 0.5 < kept.count(0) / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=500, top_p=0.9, seed=3)
    runs = [[sample(logits, params, g) for _ in range(30)] for g in (make_generator(3), make_generator(3))]
    assert runs[0] == runs[1] and len(set(runs[0])) > 5
    other = make_generator(4)
    assert [sample(logits, params, other) for _ in range(30)] != runs[0]


def test_incremental_decoder_holds_partial_characters(tokenizer):
    ids = tokenizer.encode("héllo 🙂 wörld")
    dec = IncrementalDecoder(tokenizer.decode)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == "héllo 🙂 wörld"
    assert all("\ufffd" not in p for p in pieces)


def test_stats_percentiles():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    s = summarize([float(i) for i in range(1, 101)])
    assert s["median"] == 50.5 and abs(s["p90"] - 90.1) < 1e-9 and s["max"] == 100


def test_incremental_decoder_flushes_on_last_token(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # an emoji is several byte tokens
    dec = IncrementalDecoder(tokenizer.decode)
    assert dec.push(ids[0], last=True) == tokenizer.decode(ids[:1])  # nothing held back at the end


def test_incremental_decoder_equals_decoding_everything(tokenizer):
    """Random token ids (many of them partial UTF-8 bytes): the deltas add up to the whole decode, and no delta
    shows a replacement character that a later token completes."""
    import random

    rng = random.Random(0)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        dec = IncrementalDecoder(decode)
        pieces = [dec.push(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
        assert "".join(pieces) == decode(ids)
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])
