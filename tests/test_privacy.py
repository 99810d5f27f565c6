"""Privacy of the cut: the attacks read what crosses, the defence is bitwise off at strength zero, the meter's
share falls under noise, a defended client still generates and trains over gRPC, and bad settings are one line.

The attacker trains on public text (the Old Testament, from Debian's bible-kjv) through the client's own bottom
and defence, and is scored on private text it never saw (the New Testament)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from client.exact_attack import ExactAttacker, Prefixes, floor
from client.gradient_attack import GradientLabels
from client.privacy import (
    InverterConfig,
    LearnedInverter,
    NearestNeighbour,
    Observer,
    PrivacyMeter,
    public_text,
    recovered,
    vocabulary,
    windows,
)
from splitcore.defence import Noise, Protect, secret_from_seed
from splitcore.engine import Recorder
from splitcore.errors import InvalidInput
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from tests.conftest import ROOT, TINY, subprocess_env, tiny_split_engine

GREEDY = SamplingParams(temperature=0.0)
OLD, NEW = "bible:Gen1:1-Gen50:26", "bible:Matt1:1-Matt28:20"  # public (Genesis), private (Matthew)
FAST = InverterConfig(width=128, layers=2, heads=4, steps=150, batch_size=8, block_size=32, lr=2e-3)


def _need_bible() -> None:
    if shutil.which("bible") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's bible-kjv is not installed (scripts/test.sh installs it)")
        pytest.skip("Debian's bible-kjv is not installed")


@pytest.fixture(scope="module")
def local(models_dir):
    e = tiny_split_engine(models_dir, local_trunk=True)
    yield e
    e.close()


@pytest.fixture(scope="module")
def texts(local):
    _need_bible()
    public = torch.tensor(local.encode(public_text(OLD)), dtype=torch.long)
    private = windows(torch.tensor(local.encode(public_text(NEW)), dtype=torch.long), 32, 24)
    return public, private


def _attack(local, noise: Noise, public):
    bottom = local.parts["bottom"]
    observe = Observer(bottom, noise, seed=11)  # the attacker's own draws
    inverter = LearnedInverter(bottom.wte.weight, bottom.config.n_embd, FAST, vocabulary(public))
    return inverter.fit(public, observe), observe


@pytest.fixture(scope="module")
def clean_attack(local, texts):
    return _attack(local, Noise(), texts[0])


@pytest.mark.slow
def test_learned_inverter_reads_most_private_tokens_undefended(local, texts, clean_attack):
    inverter, observe = clean_attack
    share = recovered(inverter, observe, texts[1])
    nn_share = recovered(
        NearestNeighbour(local.parts["bottom"].wte.weight, local.parts["bottom"].wpe.weight), observe, texts[1]
    )
    assert share > 0.5, share  # the meter can say "the trunk reads your prompt"
    assert nn_share > 0.9, nn_share  # random weights: the embeddings show through


@pytest.mark.slow
def test_meter_share_drops_under_noise(local, texts, clean_attack):
    noisy = Noise("gaussian", 3.0)
    inverter, observe = _attack(local, noisy, texts[0])  # retrained on defended states, as an attacker would
    clean = recovered(clean_attack[0], clean_attack[1], texts[1])
    defended = recovered(inverter, observe, texts[1])
    assert defended < clean - 0.2, (clean, defended)


def test_prefixes_give_the_bottoms_own_states(local):
    """The exact attacker's incremental bottom: a prefix token by token, and candidates at the next position,
    give exactly the states the bottom computes for the whole sequence."""
    bottom = local.parts["bottom"]
    ids = torch.randint(0, bottom.config.vocab_size, (2, 9))
    want = bottom.hidden(ids)
    p = Prefixes(bottom, 2)
    got = torch.cat([p.run(ids[:, t : t + 1], keep=True) for t in range(8)], 1)
    assert torch.allclose(got, want[:, :8], atol=1e-5)
    candidates = torch.tensor([5, int(ids[0, 8]), int(ids[1, 8]), 7])
    states = p.run(candidates, keep=False)  # (2, 4, d): every candidate at position 8 of each row
    assert torch.allclose(states[0, 1], want[0, 8], atol=1e-5) and torch.allclose(states[1, 2], want[1, 8], atol=1e-5)
    assert not torch.allclose(states[0, 0], want[0, 8], atol=1e-3)


def test_the_gradient_attacks_jacobian_is_autograds(local):
    """The gradient attack's du_s/dh_s, from copies of position s over the window's cached keys and values, is the
    Jacobian that autograd takes through the whole top (the cache must not depend on h_s)."""
    top = local.parts["top"]
    attack, h = GradientLabels(top), torch.randn(1, 7, top.config.n_embd)
    window = Prefixes(top, 1)
    with torch.no_grad():
        for s in range(7):
            window.run_states(h[:, s : s + 1], keep=True)
    for s in (0, 3, 6):

        def u_s(h_s, s=s):
            x = h.clone()
            x[0, s] = h_s
            return attack._u(x)[0, s]

        want = torch.autograd.functional.jacobian(u_s, h[0, s])
        assert torch.allclose(attack._jacobian(window.first(s), h[0, s]), want, atol=1e-5)
    assert not torch.allclose(attack._jacobian(window.first(6), h[0, 6]), attack._jacobian(window.first(5), h[0, 6]))


def test_exact_attacker_reads_every_token_undefended_and_map_beats_the_floor(local, texts, tiny):
    """Vocab matching through the public bottom reads every private token of the attacker's candidates; under
    noise, MAP with the public model as prior reads less, and never less than the floor (nothing observed)."""
    public, private = texts[0], texts[1][:6]
    bottom, prior = local.parts["bottom"], load_full(tiny)
    sent = bottom.hidden(private)
    everything = ExactAttacker(bottom, Noise()).fit(public)  # the whole vocabulary, names and numbers too
    assert torch.equal(everything.predict(sent[:2, :6]), private[:2, :6])
    assert not torch.isin(private, vocabulary(public)).all()  # Matthew has names that Genesis lacks
    vocab = ExactAttacker(bottom, Noise(), prior, vocabulary(public)).fit(public)  # then the rest where needed
    assert recovered(vocab, lambda ids: sent, private, batch=len(private)) == 1.0
    noise = Noise("gaussian", 3.0)
    noisy = Protect(noise, secret_from_seed(3))(sent, private)  # the client's own secret noise
    attacker = ExactAttacker(bottom, noise, prior, vocabulary(public)).fit(public)
    at_noise = recovered(attacker, lambda ids: noisy, private, batch=len(private))
    bottom_line, how = floor(public, private, prior, vocabulary(public))
    assert bottom_line < at_noise < 1.0, (bottom_line, at_noise)
    assert how


def test_defence_of_strength_zero_is_the_undefended_path(models_dir, local):
    h = torch.randn(1, 5, 64)
    assert Noise("laplace", 0.0, 0.0).apply(h) is h
    zero = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=0.0)
    try:
        assert zero.protect is None
        got, want = Recorder(), Recorder()
        a = zero.run("In the beginning", 8, GREEDY, tap=got)
        b = local.run("In the beginning", 8, GREEDY, tap=want)
        assert a.token_ids == b.token_ids
        assert torch.equal(got.prefill, want.prefill)
        sa, sb = zero.new_stepper(16), local.new_stepper(16)
        ids = torch.tensor([a.prompt_token_ids])
        assert torch.equal(sa.step(ids, all_positions=True).logits, sb.step(ids, all_positions=True).logits)
        sa.close(), sb.close()
    finally:
        zero.close()


def test_noise_is_calibrated_and_clipped():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 256, 64) * torch.tensor([1.0, 10.0, 100.0, 0.1])[:, None, None]
    for kind in ("gaussian", "laplace"):
        out = Noise(kind, 2.0).apply(h, Noise(kind).sample(h.shape, g))  # relative: std 2 x each position's RMS
        rms = h.pow(2).mean(-1, keepdim=True).sqrt()
        ratio = ((out - h) / rms).std()
        assert 1.9 < float(ratio) < 2.1, (kind, float(ratio))
    z = Noise().sample(h.shape, g)
    clipped = Noise("gaussian", 0.0, clip=1.0).apply(h)
    assert float(clipped.pow(2).mean(-1).sqrt().max()) <= 1.0 + 1e-5
    small = h[3:]  # under the clip: untouched
    assert torch.equal(Noise("gaussian", 0.0, clip=1.0).apply(small), small)
    fixed = Noise("gaussian", 0.5, clip=1.0).apply(h, z) - Noise("gaussian", 0.0, clip=1.0).apply(h)
    assert 0.45 < float(fixed.std()) < 0.55  # with a clip the noise does not depend on the data


def test_defended_generation_and_training_over_grpc(models_dir, server_target):
    from client.split_training import SplitTrainer, TrainConfig
    from splitcore.training import TextData

    e = tiny_split_engine(models_dir, server_target, defence="laplace", noise_scale=0.5, noise_clip=2.0)
    try:
        sent = Recorder()
        r = e.run("Hello world, this is a test", 10, GREEDY, tap=sent)
        assert len(r.token_ids) == 10 and r.stats.tokens and r.stats.tokens[0].bytes_out > 0
        clean = e.parts["bottom"].hidden(torch.tensor([r.prompt_token_ids]))
        assert not torch.allclose(sent.prefill, clean)  # what crossed is not the bottom's output
        assert float(sent.prefill.pow(2).mean(-1).sqrt().max()) < 2.0 * 3  # clipped to RMS 2, then noised
        data = TextData.from_path(ROOT / "tests" / "test_privacy.py", e.encode, block=16)
        trainer = SplitTrainer(e, TrainConfig(lora_rank=2, lr=1e-2, seed=1).lora())
        try:
            losses = [trainer.step(step, data.batch(step, 2, seed=0)).loss for step in range(1, 4)]
            assert all(torch.isfinite(torch.tensor(losses)))
            assert torch.isfinite(torch.tensor(trainer.eval_loss(data.eval_batches(2, 1)[0])))
        finally:
            trainer.close()
    finally:
        e.close()


def test_meter_reads_the_prompt_from_what_was_sent_and_caches(models_dir, local, tmp_path):
    _need_bible()
    cfg = InverterConfig(width=64, layers=1, heads=2, steps=3, batch_size=2, block_size=16)
    meter = PrivacyMeter(local, OLD, tmp_path, cfg).prepare()
    assert meter.path.is_file() and meter.report["public_tokens"] > 1000
    rec = Recorder()
    r = local.run("And Jesus said unto them", 4, GREEDY, tap=rec)
    reading = meter.read(r.prompt_token_ids, rec.prefill)
    assert len(reading.read_ids) == len(r.prompt_token_ids) and 0.0 <= reading.share <= 1.0
    assert [label for _, label in reading.segments(local.decode)].count("read") == sum(reading.hits)
    again = PrivacyMeter(local, OLD, tmp_path, cfg).prepare()  # loaded, not retrained
    assert again.report == meter.report
    assert again.read(r.prompt_token_ids, rec.prefill).read_ids == reading.read_ids
    noisy = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=1.0)
    try:
        assert PrivacyMeter(noisy, OLD, tmp_path, cfg).path != meter.path  # a defence gets its own attacker
    finally:
        noisy.close()


def test_meter_reads_past_the_inverters_context_over_any_vocabulary_through_the_generations_adapter(
    models_dir, server_target, tmp_path
):
    """The meter's exact attacker reads every position of a prompt longer than the inverter's context, any token
    of the vocabulary when told so, through the bottom of the adapter each generation runs, and says "at least"."""
    _need_bible()
    from client.split_training import Run, SplitTrainer, TrainConfig
    from splitcore.training import TextData

    out = tmp_path / "obfuscated"
    trainer_engine = tiny_split_engine(models_dir, server_target)
    cfg = TrainConfig(steps=4, eval_every=0, eval_batches=1, batch_size=2, block_size=16, lora_rank=2, lr=3e-3)
    cfg.out, cfg.client_train = str(out), "full"  # the client's bottom trained: it sends other states
    trainer = SplitTrainer(trainer_engine, cfg.lora(), "full")
    data = TextData.from_path(ROOT / "tests" / "test_privacy.py", trainer_engine.encode, block=16)
    list(Run(trainer, data, cfg, TINY))
    trainer.close(), trainer_engine.close()
    e = tiny_split_engine(models_dir, server_target, adapter=f"mine={out}")
    try:
        cfg = InverterConfig(width=64, layers=1, heads=2, steps=3, batch_size=2, block_size=16, context=32)
        meter = PrivacyMeter(e, OLD, tmp_path, cfg, vocab="public", candidates=0).prepare()
        public = vocabulary(meter.public_ids)
        ids = public[torch.randint(0, len(public), (300,), generator=torch.Generator().manual_seed(0))].tolist()
        read = {}
        for name in ("mine", e.BASE):  # the adapter's bottom, and the base model's
            rec = Recorder()
            e.run(ids, 1, GREEDY, tap=rec, adapter=name)
            read[name] = meter.read(ids, rec.prefill, name), rec.prefill
        for name, (reading, _) in read.items():
            assert reading.share == 1.0, (name, reading.share, reading.attacker)  # past position 32 and 256 too
            assert reading.attacker.startswith("exact attacker"), reading.attacker
        crossed = meter.read(ids[:24], read["mine"][1][:, :24], e.BASE)  # the adapter's states, the base bottom
        assert crossed.share < 0.9, crossed.share
        words = "And Jesus said unto them"  # "Jesus": not a token of Genesis
        prompt = e.encode(words)
        rec = Recorder()
        e.run(prompt, 1, GREEDY, tap=rec, adapter=e.BASE)
        exact, who = meter._exact(e.parts["bottom"], rec.prefill, True)
        assert exact == prompt and "then the whole vocabulary where nothing matches" in who  # "Jesus" too
        everything = PrivacyMeter(e, OLD, tmp_path, cfg, vocab="all", candidates=0).prepare()
        assert everything.path != meter.path
        exact, who = everything._exact(e.parts["bottom"], rec.prefill, True)
        assert exact == prompt and "every one of 50257 tokens" in who
    finally:
        e.close()
    cmd = [sys.executable, "-m", "client", "generate", "--help"]
    text = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120).stdout
    assert "--attack-vocab" in text and "--attack-candidates" in text


@pytest.mark.parametrize(
    "settings,msg",
    [
        (dict(defence="gaussian", noise_scale=-1.0), "noise scale must be a finite number >= 0"),
        (dict(defence="speckle"), "unknown defence 'speckle'"),
        (dict(noise_scale=1.0), "need a defence"),
        (dict(privacy_meter=True), "--privacy-meter needs public text"),
        (dict(grad_noise=float("nan")), "--grad-noise must be a finite number >= 0"),
        (dict(grad_noise=-0.5), "--grad-noise must be a finite number >= 0"),
        (dict(attack_candidates=-1), "--attack-candidates must be >= 0"),
    ],
)
def test_bad_defence_settings_are_clear_errors(models_dir, settings, msg):
    with pytest.raises(InvalidInput, match=msg):
        tiny_split_engine(models_dir, local_trunk=True, **settings)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--defence", "gaussian", "--noise-scale", "-0.5"], "error: noise scale must be a finite number >= 0"),
        (["--defence", "speckle"], "invalid choice: 'speckle'"),
        (["--privacy-meter"], "error: --privacy-meter needs public text"),
        (
            ["--privacy-meter", "--attack-data", "/nonexistent/text"],
            "error: attack data (or bible:PASSAGES) '/nonexistent/text' does not exist",
        ),
    ],
)
def test_bad_privacy_flags_are_one_readable_line(args, msg):
    cmd = [sys.executable, "-m", "client", "generate", "hi", "--model", TINY, "--local-trunk", "--device", "cpu"]
    out = subprocess.run(cmd + args, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert msg in out.stderr.strip().splitlines()[-1], out.stderr


def test_generate_cli_reports_the_meter_in_json(tmp_path):
    _need_bible()
    import json

    cmd = [sys.executable, "-m", "client", "generate", "And Jesus said", "--model", TINY, "--local-trunk"]
    cmd += ["--device", "cpu", "--max-tokens", "3", "--temperature", "0", "--json", "--privacy-meter"]
    cmd += ["--attack-data", OLD, "--attack-steps", "2", "--models-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)["privacy"]
    assert got["prompt_tokens"] == len(json.loads(out.stdout)["prompt_token_ids"])
    assert 0.0 <= got["recovered_share"] <= 1.0
    assert got["attacker"].startswith(("exact attacker", "learned inverter", "nearest neighbour"))
    assert "privacy meter: training the attacker" in out.stderr  # progress shown


def test_learned_obfuscation_trains_the_bottom_against_an_inverter(models_dir, server_target):
    from client.split_training import SplitTrainer, TrainConfig
    from splitcore.training import TextData

    e = tiny_split_engine(models_dir, server_target)
    try:
        data = TextData.from_path(ROOT / "tests" / "test_privacy.py", e.encode, block=16)
        settings = TrainConfig(lora_rank=2, lr=1e-3, seed=1).lora()
        with pytest.raises(InvalidInput, match="--client-train lora or full"):
            SplitTrainer(e, settings, "none", privacy_weight=1.0)
        from client.privacy import vocabulary

        trainer = SplitTrainer(e, settings, "full", privacy_weight=1.0, adversary_classes=vocabulary(data.train))
        try:
            before = trainer.bottom.h["0"].mlp.c_fc.weight.detach().clone()
            for step in range(1, 4):
                assert torch.isfinite(torch.tensor(trainer.step(step, data.batch(step, 2, seed=0)).loss))
            assert torch.isfinite(torch.tensor(trainer.adversary.last_ce))
            assert not torch.equal(before, trainer.bottom.h["0"].mlp.c_fc.weight)  # the client's bottom trained
            assert "wte.weight" in trainer.adapter()  # and is the client's to keep, with the adapter
        finally:
            trainer.close()
    finally:
        e.close()


def test_privacy_report_prints_the_table_for_the_clients_settings(tmp_path):
    _need_bible()
    cmd = [sys.executable, "-m", "client", "privacy-report", "--model", TINY, "--device", "cpu"]
    cmd += ["--defence", "gaussian", "--noise-scale", "3", "--denoise", "subtract", "--attack-data", OLD]
    cmd += ["--private-data", NEW, "--attack-steps", "5", "--windows", "2", "--prompts", "1"]
    cmd += ["--models-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "cut 2,10" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| none, cut 2,10", "| gaussian 3 + denoise subtract, cut 2,10"]
    assert "training the learned inverter" in out.stderr  # progress shown
    assert "| the trunk reads at least | exact attacker |" in out.stdout
    assert "| nothing observed (the floor: " in out.stdout


@pytest.mark.slow
def test_learned_denoiser_starts_as_subtraction_learns_and_generates(models_dir, local, tmp_path):
    from client.denoise import train_denoiser
    from splitcore.defence import Denoiser, subtract_noise

    out, clean = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    sent = clean + torch.randn(1, 4, 64)
    assert torch.allclose(Denoiser(64)(out, clean, sent), subtract_noise(out, clean, sent), atol=1e-6)
    noisy = tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=3.0, defence_seed=1)
    try:
        ids = torch.tensor(noisy.encode("In the beginning God created the heaven and the earth. " * 40))
        losses = []
        train_denoiser(noisy, ids, 30, batch_size=4, block_size=32, progress=lambda s, n, loss: losses.append(loss))
        assert sum(losses[-5:]) < sum(losses[:5]), losses  # it learns
        train_denoiser(noisy, ids, 2, batch_size=2, block_size=32).save(tmp_path / "d")
    finally:
        noisy.close()
    e = tiny_split_engine(
        models_dir, local_trunk=True, defence="gaussian", noise_scale=3.0, denoise=str(tmp_path / "d")
    )
    try:
        assert isinstance(e.repair, Denoiser) and len(e.run("Hello", 4, GREEDY).token_ids) == 4
    finally:
        e.close()
    with pytest.raises(InvalidInput, match="not a trained denoiser"):
        tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=1.0, denoise=str(tmp_path))
    with pytest.raises(InvalidInput, match="unknown denoiser 'blur'"):
        tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=1.0, denoise="blur")


def test_the_benchs_training_row_reads_labels_from_gradients_and_tokens_from_states(models_dir, server_target, texts):
    """bench_privacy's split-training row: with the gradient clipped alone (no noise), the gradient attack reads
    every label of the step it reads, and the exact attacker every token of the states sent."""
    from client.privacy_eval import gradient_row

    train = public_text(NEW)[20000:40000]  # the private text's own training half, as the bench takes it
    row = gradient_row(TINY, str(models_dir), server_target, "none", 0.0, train, texts[1][:8], 2, (2,),
                       public_ids=texts[0], grad_clip=1e-4)  # fmt: skip
    assert row["setting"] == "--client-train none --grad-clip 0.0001"
    assert row["labels"] == 8 * 63 and row["share"] == 1.0 and row["states_share"] == 1.0, row
    assert row["at_least"] == 1.0 and row["perplexity"] > 1


def test_an_inverter_learns_a_bottom_from_pairs_alone(local, texts):
    """fit_pairs: an inverter that never saw the bottom, only windows of its states with the tokens read some
    other way (-1 where none, as the first position of a window whose tokens come from its gradient), learns to
    read it; one trained on nothing reads next to nothing."""
    bottom = local.parts["bottom"]
    ids = windows(texts[0], 32)[:256]
    with torch.no_grad():
        states = bottom.hidden(ids)
    known = ids.clone()
    known[:, 0] = -1
    observe = Observer(bottom, Noise(), seed=3)
    fresh = LearnedInverter(bottom.wte.weight, bottom.config.n_embd, FAST, vocabulary(texts[0]))
    untrained = recovered(fresh, observe, texts[1])
    learned = recovered(fresh.fit_pairs(states, known, FAST.steps), observe, texts[1])
    assert untrained < 0.05 and learned > 0.5, (untrained, learned)


def test_the_trunk_collects_pairs_over_the_clients_training(models_dir, server_target, tmp_path):
    """train_split with pairs_to: over the last steps of a client's training, the trunk's operator keeps the
    states sent and the tokens the gradient attack reads: the windows' own tokens (all of them with the public
    top), position 0 unknown."""
    from client.privacy_eval import Setting, train_split

    text = (ROOT / "tests" / "data" / "corpus.txt").read_text()
    pairs = tmp_path / "pairs.pt"
    train_split(TINY, str(models_dir), server_target, Setting("2,10"), text, str(tmp_path / "out"), 3, 1, "none",
                pairs_to=str(pairs), collect_steps=2)  # fmt: skip
    got = torch.load(pairs)
    assert got["states"].shape[:2] == got["ids"].shape == (16, 64)
    assert (got["ids"][:, 0] == -1).all()
    e = tiny_split_engine(models_dir, local_trunk=True)
    try:  # the client's batches of steps 2 and 3 (train_split's data and seed), sent through the public bottom
        from splitcore.training import TextData

        f = tmp_path / "text.txt"
        f.write_text(text, encoding="utf-8")
        data = TextData.from_path(f, e.encode, 64)
        want = torch.cat([data.batch(step, 8, 1) for step in (2, 3)])
        assert torch.equal(got["ids"][:, 1:], want[:, 1:])
        with torch.no_grad():
            assert torch.allclose(got["states"], e.parts["bottom"].hidden(want), atol=1e-5)
    finally:
        e.close()


GRAD_CLIP = 2e-3  # below most positions' gradient RMS in this test (about 1e-2): clipping changes what is sent


@pytest.mark.parametrize(
    ("client_train", "grad_noise", "grad_clip"),
    [("none", 0.0, 0.0), ("lora", 0.0, 0.0), ("none", 3.0, 0.0), ("none", 0.0, GRAD_CLIP), ("none", 3.0, GRAD_CLIP)],
)
def test_the_gradient_of_split_training_gives_the_labels_back(
    models_dir, server_target, client_train, grad_noise, grad_clip
):
    """What the trunk holds in a split training step (its output) and what the client sends back (the gradient),
    read by the gradient attack through the public top: the training labels, all of them with the public top
    (--client-train none), and nearly all with a LoRA the client trains on its top (it starts at zero). The docs
    say so (docs/privacy.md). The client's secret noise on that gradient (--grad-noise 3; the attacker knows the
    setting and reads MAP with the public model's prior) makes the reading drop. Clipping alone hides nothing: the
    attacker clips each candidate's gradient as the client would; clipped and noised, the reading drops."""
    from client.gradient_attack import StepTap
    from client.split_training import SplitTrainer, TrainConfig
    from splitcore.training import TextData

    e = tiny_split_engine(models_dir, server_target, grad_noise=grad_noise, grad_clip=grad_clip)
    try:
        data = TextData.from_path(ROOT / "tests" / "data" / "corpus.txt", e.encode, block=24)
        trainer = SplitTrainer(e, TrainConfig(lora_rank=2, lr=1e-2, seed=1).lora(), client_train=client_train)
        trainer.remote = tap = StepTap(trainer.remote)
        batches = [data.batch(step, 2, seed=0) for step in range(1, 4)]
        try:
            for step, ids in enumerate(batches, 1):
                trainer.step(step, ids)
        finally:
            trainer.close()
        public = tiny_split_engine(models_dir, local_trunk=True)  # the attacker's: the public weights alone
        attack = GradientLabels(public.parts["top"], Noise("gaussian", grad_noise, grad_clip))  # it knows the code
        read = [attack.read(h, g) for h, g in tap.steps]
        rms = torch.cat([g.pow(2).mean(-1)[:, :-1].sqrt().flatten() for _, g in tap.steps])
        if grad_clip and not grad_noise:  # clipping did clip: most positions arrived at an RMS of the clip
            assert (rms - grad_clip).abs().lt(1e-9).float().mean() > 0.5, rms
        public.close()
        hits = sum(int((r == ids[:, 1:]).sum()) for r, ids in zip(read, batches, strict=True))
        total = sum(ids[:, 1:].numel() for ids in batches)
    finally:
        e.close()
    print(f"gradient attack, --client-train {client_train} --grad-noise {grad_noise:g} --grad-clip {grad_clip:g}: "
          f"{hits} of {total} read, gradient RMS median {rms.median():.2g}")  # fmt: skip
    if grad_noise == 0:
        assert hits / total >= (0.98 if client_train == "none" else 0.9), (hits, total)
    else:
        assert hits / total < 0.2, (hits, total)
