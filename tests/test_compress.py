"""Compressed parts (splitcore/compress.py): pruning is exact and torch's rule, the split with a compressed trunk
is the full model compressed the same way, int8 stays close to float32, the fingerprint covers the trunk's
compression, and bad settings are one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn.utils import prune

from splitcomm.errors import TrunkError
from splitcore.compress import Compression, prune_2_4, prune_smallest, weight_bytes
from splitcore.engine import FullEngine
from splitcore.errors import InvalidInput, Mismatch
from splitcore.gpt2 import to_state
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from tests.conftest import ROOT, TINY, start_tiny_server, subprocess_env, tiny_split_engine

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["The history of natural language processing", "And the LORD said unto", "In the beginning God"]
# int8 against float32 on the trained 2-block model: the largest |logit difference| allowed (docs/compression.md)
INT8_LOGIT_TOLERANCE = 0.25
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_prune_0_is_the_uncompressed_model_bitwise(tiny):
    plain, pruned = load_full(tiny), Compression.parse("prune:0").apply(load_full(tiny))
    a, b = to_state(plain), to_state(pruned)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[5, 9, 200, 3, 77]])
    assert torch.equal(plain(ids, all_positions=True), pruned(ids, all_positions=True))
    assert str(Compression.parse("prune:0")) == "none" == str(Compression.parse(None))


def test_prune_zeroes_exactly_the_fraction_by_smallest_magnitude_as_torch_does(tiny):
    model = Compression.parse("prune:0.3").apply(load_full(tiny))
    before = load_full(tiny)
    n = 0
    for i in tiny_layers(tiny):
        for kind in LINEARS:
            w0 = before.h[str(i)].get_submodule(kind).weight.detach()
            w = model.h[str(i)].get_submodule(kind).weight.detach()
            zeroed = w == 0
            assert abs(int(zeroed.sum()) - 0.3 * w.numel()) <= 1, (i, kind)
            assert w0[zeroed].abs().max() <= w0[~zeroed].abs().min()  # the smallest went
            assert torch.equal(w[~zeroed], w0[~zeroed])  # and nothing else changed
            reference = torch.nn.Linear(w0.shape[1], w0.shape[0])
            with torch.no_grad():
                reference.weight.copy_(w0)
            prune.l1_unstructured(reference, "weight", amount=0.3)
            assert torch.equal(reference.weight.detach(), w)
            n += 1
    assert n == 4 * tiny.config.n_layer
    assert torch.equal(model.wte.weight, before.wte.weight)  # the embedding (and the tied head) stay whole


def tiny_layers(model) -> range:
    return range(model.config.n_layer)


def test_2_4_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[0.1, -4.0, 3.0, 0.2, 1.0, 2.0, -3.0, 4.0]])
    assert torch.equal(prune_2_4(w), torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -3.0, 4.0]]))
    w = torch.randn(48, 64)
    kept = (prune_2_4(w) != 0).view(-1, 4).sum(1)
    assert bool((kept == 2).all())
    with pytest.raises(InvalidInput, match="multiple of 4"):
        prune_2_4(torch.randn(4, 6))
    assert torch.equal(prune_smallest(w, 0.5) == 0, w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["prune:0.3", "prune24", "int8"])
def test_split_with_a_compressed_trunk_is_the_full_model_compressed_alike(models_dir, tiny, spec):
    srv = start_tiny_server(models_dir, compress=spec)
    try:
        split = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}", compress=spec)
        full = FullEngine(tiny, torch.device("cpu"), torch.float32, compress=spec)
        plain = FullEngine(tiny, torch.device("cpu"), torch.float32)
        assert split.check_server().fingerprint.compression == str(Compression.parse(spec))
        for prompt in PROMPTS:
            got, want = split.run(prompt, 24, GREEDY), full.run(prompt, 24, GREEDY)
            assert got.token_ids == want.token_ids
        # the log-probabilities too, exactly: the prompt's, from one forward each way
        ids = full.encode(PROMPTS[0])
        assert torch.equal(logprobs(split, ids), logprobs(full, ids))
        assert not torch.equal(logprobs(full, ids), logprobs(plain, ids))  # it did compress
        split.close()
    finally:
        srv.stop(0.5)


def logprobs(engine, ids: list[int]) -> torch.Tensor:
    return torch.tensor([lp for lp, _ in engine.score(ids)])


@pytest.mark.slow
def test_int8_stays_close_to_float32_on_a_trained_model(trained_tiny):
    model = trained_tiny
    ref, q = load_full(model), Compression.parse("int8").apply(load_full(model))
    ids = torch.tensor([[818, 262, 3726, 1793, 2727, 262, 9538, 290, 262, 4534, 13]])
    with torch.no_grad():
        diff = float((ref(ids, all_positions=True) - q(ids, all_positions=True)).abs().max())
    assert 0 < diff < INT8_LOGIT_TOLERANCE
    plain = FullEngine(model, torch.device("cpu"), torch.float32)
    int8 = FullEngine(model, torch.device("cpu"), torch.float32, compress="int8")
    for prompt in PROMPTS:
        assert int8.run(prompt, 32, GREEDY).token_ids == plain.run(prompt, 32, GREEDY).token_ids
    assert weight_bytes(q) < weight_bytes(ref)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A small model trained on the Old Testament (the recipe of trained:kjv, shortened), so that greedy tokens
    have clear winners."""
    from splitcore import presets
    from splitcore.models import resolve_model

    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's bible-kjv is not installed (scripts/test.sh installs it)")
        pytest.skip("Debian's bible-kjv is not installed")
    out = tmp_path_factory.mktemp("trained") / "trained-tiny"
    recipe = presets.Recipe(n_embd=64, n_head=4, steps=60, batch_size=8, block_size=64, warmup=5, lr=3e-3)
    presets.build("kjv", out, recipe)
    return resolve_model(str(out), out.parent)


def test_a_trunk_compressed_otherwise_is_refused_naming_it(models_dir):
    srv = start_tiny_server(models_dir, compress="prune:0.3")
    try:
        target = f"127.0.0.1:{srv.port}"
        engine = tiny_split_engine(models_dir, target)  # no compression here
        with pytest.raises(
            Mismatch,
            match=r"split 2,10 compressed prune:0\.3, this client has random:tiny split 2,10; .*--trunk-compress",
        ):
            engine.check_server()
        with pytest.raises(TrunkError, match=r"the trunk's compression \(prune:0\.3 vs none\)"):
            engine.run("Hello", 3, GREEDY)  # the server refuses the session itself, too
        engine.close()
        ok = tiny_split_engine(models_dir, target, trunk_compress="prune:0.3")  # its own parts uncompressed
        assert len(ok.run("Hello", 3, GREEDY).token_ids) == 3
        ok.close()
    finally:
        srv.stop(0.5)


def test_an_int8_trunk_refuses_adapters_and_training_in_one_line(models_dir, tiny):
    from client.split_training import SplitTrainer
    from splitcore.lora import LoraSettings

    srv = start_tiny_server(models_dir, compress="int8")
    try:
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}", trunk_compress="int8")
        assert len(engine.run("Hello", 3, GREEDY).token_ids) == 3
        with pytest.raises(TrunkError, match="int8-quantised"):
            trainer = SplitTrainer(engine, LoraSettings(rank=2))
            trainer.step(0, torch.randint(0, 100, (1, 8)))
        engine.close()
    finally:
        srv.stop(0.5)
    from splitcore.lora import add_lora

    with pytest.raises(InvalidInput, match="int8-quantised"):
        add_lora(Compression.parse("int8").apply(load_full(tiny)), LoraSettings(rank=2))


@pytest.mark.parametrize(
    "command",
    [
        ["server", "--compress", "prune:1.5"],
        ["client", "generate", "--local-trunk", "--compress", "int3", "Hello"],
        ["client", "generate", "--local-trunk", "--trunk-compress", "prune:x", "Hello"],
        ["baseline", "generate", "--compress", "prune", "Hello"],
    ],
)
def test_a_bad_compression_is_one_readable_line(command):
    r = subprocess.run(
        [sys.executable, "-m", *command, "--model", TINY],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --") and "compress" in lines[0], r.stderr


@pytest.mark.slow
def test_sessions_batched_on_an_int8_trunk_get_what_they_get_alone(models_dir):
    """torch's int8 Linear quantises its input with one scale per call: the trunk runs it row by row, so that a
    session's tokens do not depend on whom it is batched with."""
    from tests.test_batching import _greedy, assert_alike, greedy_together

    srv = start_tiny_server(models_dir, compress="int8", max_sessions=12, kv_slots=10, batch_wait_ms=50)
    try:
        engine = tiny_split_engine(models_dir, f"127.0.0.1:{srv.port}", compress="int8")
        jobs = [(PROMPTS[i % 3] + " " * (i // 3), 10 + i % 3) for i in range(8)]
        alone = [_greedy(engine, p, n) for p, n in jobs]
        together = greedy_together(engine, jobs)
        assert max(n for n, k in srv.runtime.stats.batch_sizes.items() if k) >= 4  # the steps did meet in batches
        assert_alike(alone, together)
        engine.close()
    finally:
        srv.stop(0.5)


def test_the_privacy_meter_trains_its_attacker_through_the_compressed_bottom(models_dir, tmp_path):
    """The meter's attacker is cached per bottom it attacks: a compressed client gets an attacker of its own."""
    from client.privacy import PrivacyMeter

    plain = tiny_split_engine(models_dir, local_trunk=True)
    pruned = tiny_split_engine(models_dir, local_trunk=True, compress="prune:0.5")
    meters = [PrivacyMeter(e, "bible:Gen1:1-Gen1:5", tmp_path) for e in (plain, pruned)]
    assert meters[0].path != meters[1].path
    assert float((meters[1].bottom.h["0"].mlp.c_fc.weight == 0).float().mean()) > 0.49  # it attacks the pruned one
