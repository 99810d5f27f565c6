"""Speculative decoding, greedy: drafts from prompt lookup or the client's own parts, verified several to a round
trip over real gRPC, give exactly plain greedy's tokens; the statistics say how many were accepted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from splitcore.engine import FullEngine
from splitcore.errors import InvalidInput
from splitcore.sampling import SamplingParams
from splitcore.speculative import PromptLookup
from tests.conftest import TINY, subprocess_env, tiny_split_engine, wait_for

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The history of natural language processing", "Once upon a time there was", "A"]


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    look = PromptLookup(max_ngram=3)
    assert look.propose([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # the bigram 2 3 was followed by 4 5
    assert look.propose([7, 1, 8, 1], 3) == [8, 1]  # unigram 1, its latest earlier occurrence
    assert look.propose([1, 2, 3], 4) == []  # nothing repeats


@pytest.mark.parametrize("source", ["lookup", "self"])
def test_split_speculative_greedy_equals_plain_greedy(models_dir, server, source):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{server.port}")
    for prompt in PROMPTS:
        plain = engine.run(prompt, 40, GREEDY)
        spec = engine.run(prompt, 40, GREEDY, speculate=source)
        assert spec.token_ids == plain.token_ids, (source, prompt)
        s = spec.stats.speculation
        assert s.calls >= 1 and s.drafted >= s.accepted
    # random tiny weights repeat themselves, so drafts get accepted and round trips are saved
    assert s.accepted > 0 and s.calls < 39
    report = spec.stats.to_dict()["speculation"]
    assert report["source"] == source and report["tokens_per_round_trip"] > 1
    engine.close()
    wait_for(lambda: server.sessions.active() == 0, what="sessions freed")


def test_full_model_speculative_lookup_equals_plain(tiny):
    engine = FullEngine(tiny, torch.device("cpu"), torch.float32)
    for prompt in PROMPTS:
        assert engine.run(prompt, 40, GREEDY, speculate="lookup").token_ids == engine.run(prompt, 40, GREEDY).token_ids
    with pytest.raises(InvalidInput, match="needs the split client"):
        engine.run("hi", 5, GREEDY, speculate="self")
    with pytest.raises(InvalidInput, match="greedy only"):
        engine.run("hi", 5, SamplingParams(temperature=0.8), speculate="lookup")


def test_cli_speculate_json_reports_acceptance(models_dir, server):
    args = [
        sys.executable,
        "-m",
        "client",
        "generate",
        "The history of",
        "--model",
        TINY,
        "--models-dir",
        str(models_dir),
        "--server",
        f"127.0.0.1:{server.port}",
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "30",
        "--speculate",
        "lookup",
        "--json",
    ]
    p = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    plain = subprocess.run(args[:-3] + ["--json"], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert json.loads(plain.stdout)["token_ids"] == out["token_ids"]
    assert out["stats"]["speculation"]["verifications"] >= 1
