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
from splitcore.sampling import SamplingParams, distribution
from splitcore.speculative import DraftLength, PromptLookup, verify
from tests.conftest import TINY, subprocess_env, tiny_split_engine, wait_for

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The history of natural language processing", "Once upon a time there was", "A"]


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    look = PromptLookup(max_ngram=3)
    assert look.propose([1, 2, 3, 4, 5, 9, 2, 3], 2) == ([4, 5], None)  # the bigram 2 3 was followed by 4 5
    assert look.propose([7, 1, 8, 1], 3) == ([8, 1], None)  # unigram 1, its latest earlier occurrence
    assert look.propose([1, 2, 3], 4) == ([], None)  # nothing repeats


def test_draft_length_follows_round_trip_and_acceptance():
    def chosen(acceptance, plain_s, extra_s, draft_s):
        d = DraftLength(8)
        assert d.next() == 0  # a plain round first, to measure the round trip
        for _ in range(20):
            d.update(0, 0, 0.0, plain_s)
            d.update(10, round(10 * acceptance), 10 * draft_s, plain_s + extra_s)
        return d.next()

    assert chosen(1.0, 0.050, 0.0, 0.0) == 8  # a slow trunk, free and perfect drafts: as many as allowed
    assert chosen(0.25, 0.002, 0.0, 0.002) == 0  # poor drafts that cost as much as a round trip: none
    assert chosen(0.1, 0.010, 0.002, 0.0) == 0  # free drafts that are almost never right: none either
    assert chosen(0.4, 0.020, 0.0, 0.004) == 1  # middling ones that cost a fifth of a round trip: one
    assert 1 < chosen(0.75, 0.020, 0.001, 0.003) < 8  # in between
    assert DraftLength(5, adaptive=False).next() == 5
    off = DraftLength(4)
    off.update(0, 0, 0.0, 0.002)
    for _ in range(5):
        off.update(2, 0, 0.004, 0.003)
    seen = []
    for _ in range(40):
        seen.append(off.next())
        off.update(seen[-1], 0, 0.002 * seen[-1], 0.002 + 0.001 * seen[-1])  # every probe fails
    assert seen[:10] == [0] * 8 + [1, 0]  # drafting off, with a probe now and then
    assert [i for i, k in enumerate(seen) if k] == [8, 25]  # twice as seldom after a failed probe


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


def test_speculation_gives_plain_decodings_log_probabilities(tiny):
    """One generation loop: log-probabilities (the tokens' and the prompt's) come with speculation too, and are
    plain decoding's, though verified several tokens to a step."""
    engine = FullEngine(tiny, torch.device("cpu"), torch.float32)
    for prompt in PROMPTS:
        runs = []
        for speculate in ("none", "lookup"):
            prompt_lps: list = []
            events = list(engine.stream(prompt, 40, GREEDY, speculate=speculate, logprobs=3, prompt_lps=prompt_lps))
            runs.append((events, prompt_lps))
        (plain, plain_prompt), (spec, spec_prompt) = runs
        assert [e.token_id for e in spec] == [e.token_id for e in plain]
        for a, b in zip(spec, plain, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        assert spec_prompt == plain_prompt  # the same prefill


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


# --- speculative sampling: the output is distributed as plain sampling's -----------------------------------
ALPHA = 1e-3  # significance level of every test below; their seeds are fixed, so each passes or fails always


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs` (cells expecting < 5 pooled)."""
    n = float(counts.sum())
    expected = probs.double() * n
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    assert float((counts[expected == 0]).sum()) == 0, "a token the target never gives came out"
    keep = expected > 0
    stat = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.slow
@pytest.mark.parametrize("drafts", [1, 3])
@pytest.mark.parametrize("kind", ["sampled", "deterministic"])
def test_verify_gives_the_targets_distribution(drafts, kind):
    """The first token a verification yields is distributed as the model's p, whatever the draft: one drawn from
    a q far from p, or a fixed one (prompt lookup). 20,000 verifications, vocabulary of 8."""
    g = torch.Generator().manual_seed(11)
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95)
    logits = torch.randn(drafts + 1, 8, generator=g) * 2
    p0 = distribution(logits[0], params)
    q = torch.softmax(torch.randn(drafts, 8, generator=g), dim=-1)  # a draft model that disagrees with p
    counts = torch.zeros(8)
    accepted = 0
    for _ in range(20_000):
        if kind == "sampled":
            d = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
            new, a = verify(d, q, logits, params, g)
        else:
            new, a = verify([3] * drafts, None, logits, params, g)  # always proposes token 3
        counts[new[0]] += 1
        accepted += a
    assert chi_square_p(counts, p0) > ALPHA
    assert 0 < accepted  # drafts do get accepted: the test exercises both branches


@pytest.mark.slow
def test_speculative_sampling_matches_plain_over_the_split(models_dir, tiny, full_model):
    """End to end, the split's own parts drafting (self) over an in-process trunk: the second generated token's
    distribution is the model's, sum over t1 of p(t1) p(t2 | t1), computed exactly with HF's model. 1,500 seeded
    generations, top-k 4."""
    engine = tiny_split_engine(models_dir, local_trunk=True)
    params = SamplingParams(temperature=1.0, top_k=4)
    prompt = engine.encode("The history of natural language processing")
    with torch.no_grad():
        p1 = distribution(full_model(torch.tensor([prompt])).logits[0, -1], params)
        firsts = p1.nonzero()[:, 0].tolist()
        rows = full_model(torch.tensor([prompt + [t] for t in firsts])).logits[:, -1]
        p2 = (p1[firsts][:, None] * distribution(rows, params)).sum(0)
    counts, drafted, accepted = torch.zeros(p2.shape[0]), 0, 0
    for seed in range(1500):
        run = engine.run(prompt, 3, SamplingParams(1.0, 4, seed=seed), speculate="self")
        counts[run.token_ids[1]] += 1
        stats = run.stats.speculation
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    engine.close()
    assert chi_square_p(counts, p2) > ALPHA
    assert drafted > 0 and 0 < accepted < drafted  # both acceptance and rejection happened


def test_speculative_sampling_is_reproducible_with_a_seed(models_dir, server):
    engine = tiny_split_engine(models_dir, f"127.0.0.1:{server.port}")
    params = SamplingParams(temperature=1.0, top_k=20, seed=5)
    for source in ("lookup", "self"):
        a = engine.run(PROMPTS[0], 16, params, speculate=source).token_ids
        assert a == engine.run(PROMPTS[0], 16, params, speculate=source).token_ids
    engine.close()
