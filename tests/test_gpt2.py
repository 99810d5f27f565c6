"""The model core against Hugging Face's GPT2LMHeadModel: logits, batches of rows at different positions,
truncation, the static-shape decode step, gradients, and the checkpoint layouts found on the hub."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from splitcore.cudagraph import DecoderPool, StaticDecoder, bucket
from splitcore.generate import FullStepper
from splitcore.models import resolve_model
from splitcore.parts import load_full, load_parts
from tests.conftest import load_hf_model

PROMPT = [15496, 995, 11, 314, 716, 257, 3303]  # "Hello world, I am a ..."
TOL = 1e-5


def _shape_model(tmp_path_factory, name: str, n_embd: int, n_head: int):
    """A checkpoint with the width and heads of a real GPT-2 size (fewer layers and a smaller vocabulary, to keep
    the test fast), saved by HF and loaded back through the user's loading code."""
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=6, n_embd=n_embd, n_head=n_head, vocab_size=4096, n_positions=1024, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return resolve_model(str(d), d)


@pytest.fixture(scope="module", params=[("gpt2", 768, 12), ("gpt2-medium", 1024, 16)], ids=lambda p: p[0])
def shaped(request, tmp_path_factory):
    return _shape_model(tmp_path_factory, *request.param)


@torch.inference_mode()
def _against_hf(model, parts_split: str | None, steps: int = 40) -> float:
    """Max |ours - HF| over a prefill, `steps` greedy decode steps and a 3-token chunk on the full cache."""
    hf = load_hf_model(model.path)
    ours = load_full(model)
    parts = load_parts(model, parts_split) if parts_split else None
    cache, hf_cache = ours.new_cache(), DynamicCache()
    caches = {k: p.new_cache() for k, p in parts.items()} if parts else None
    vocab = model.config.vocab_size
    chunk, worst = torch.tensor([[t % vocab for t in PROMPT]]), 0.0
    for i in range(steps + 2):
        ref = hf(chunk, past_key_values=hf_cache, use_cache=True).logits[:, -1]
        got = ours(chunk, cache)
        worst = max(worst, float((ref - got).abs().max()))
        if parts:
            h = parts["trunk"](parts["bottom"](chunk, caches["bottom"]), caches["trunk"])
            assert torch.equal(parts["top"](h, caches["top"]), got)  # split == full, exactly
        chunk = torch.tensor([[t % vocab for t in (464, 2068, 7586)]]) if i == steps else ref.argmax(-1, keepdim=True)
    assert cache.length == len(PROMPT) + steps + 3
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("split", ["1,5", "3,4"])
def test_core_matches_hf_on_real_shapes(shaped, split):
    worst = _against_hf(shaped, split)
    print(f"{shaped.path.name} split {split}: max |logit diff| vs HF = {worst:.3g}")
    assert worst < TOL


@pytest.mark.parametrize("split", ["2,10", "1,11", "6,7"])
def test_core_matches_hf_on_tiny(tiny, split):
    assert _against_hf(tiny, split) < TOL


@torch.inference_mode()
def _solo(model, ids: list[int], then: list[int]) -> list[torch.Tensor]:
    cache = model.new_cache()
    out = [model(torch.tensor([ids]), cache)[0]]
    for t in then:
        out.append(model(torch.tensor([[t]]), cache)[0])
    return out


@torch.inference_mode()
def test_batch_rows_at_different_positions_give_solo_logits(tiny):
    model = load_full(tiny)
    prompts = [PROMPT, PROMPT[:2], [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]]
    follow = [[11, 290, 257, 1110], [1312, 373, 6, 50], [13, 13, 464, 2068]]
    cache = model.new_cache(rows=3)
    got = [[model(torch.tensor([p]), cache, row=r)[0]] for r, p in enumerate(prompts)]  # each row its prefill
    assert cache.lengths == [7, 2, 10]
    for i in range(3):  # then all rows in one forward, each at its own position
        logits = model(torch.tensor([[f[i]] for f in follow]), cache)
        for r in range(3):
            got[r].append(logits[r])
    chunk = model(torch.tensor([f[3:] for f in follow]), cache)  # and a step whose rows attend past different ends
    for r, (p, f) in enumerate(zip(prompts, follow, strict=True)):
        want = _solo(model, p, f)
        diffs = [float((a - b).abs().max()) for a, b in zip(want, [*got[r], chunk[r]], strict=True)]
        assert max(diffs) < TOL, (r, diffs)


@torch.inference_mode()
def test_truncate_then_continue_equals_never_going_past(tiny):
    model = load_full(tiny)
    ids = torch.tensor([PROMPT])
    a, b = model.new_cache(), model.new_cache()
    model(ids, a)
    for t in [11, 290, 257, 1110, 3303]:
        model(torch.tensor([[t]]), a)  # five positions that will be rolled back
    a.truncate(len(PROMPT) + 1)
    model(ids, b)
    model(torch.tensor([[11]]), b)
    for chunk in ([[464, 2068]], [[13]], [[7586]]):
        assert torch.equal(model(torch.tensor(chunk), a), model(torch.tensor(chunk), b))
    assert a.length == b.length == len(PROMPT) + 5


@torch.inference_mode()
def test_static_decode_step_matches_eager_for_rows_at_different_positions(tiny):
    """The step a CUDA graph captures, run eagerly on the CPU: attention over the whole fixed room, masked."""
    parts = load_parts(tiny, "2,10")
    full = load_full(tiny)
    for model, x in [(full, None), (parts["trunk"], torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0)))]:
        dec = StaticDecoder(model, capacity=64, rows=2, graphs=True)  # no CUDA here: no graph, same step
        assert not dec.graphed and dec.cache.capacity == 64 and not dec.cache.growable
        ref = model.new_cache(rows=2)
        prefills = [torch.tensor([PROMPT]), torch.tensor([PROMPT[:3]])]
        if x is not None:
            prefills = [torch.randn(1, n, 64, generator=torch.Generator().manual_seed(n)) for n in (7, 3)]
        for r, p in enumerate(prefills):
            model(p, dec.cache, row=r)
            model(p, ref, row=r)
        for step in range(5):
            inp = torch.tensor([[11 + step], [290 + step]]) if x is None else x + step
            want = model(inp, ref)
            got = dec.step(inp)
            assert float((want - got).abs().max()) < TOL
        assert dec.cache.lengths == ref.lengths == [12, 8]


def test_decoder_pool_reuses_an_emptied_decoder(tiny):
    pool = DecoderPool(load_full(tiny), graphs=False)
    a = pool.acquire(100)
    assert a.capacity == bucket(100, 1024) == 128
    with torch.inference_mode():
        a.model(torch.tensor([PROMPT]), a.cache)
    pool.release(a)
    b = pool.acquire(70)
    assert b is a and b.cache.length == 0 and pool.captured == 1
    assert pool.acquire(70) is not a and pool.captured == 2  # a second one while the first is in use
    warm = DecoderPool(load_full(tiny), graphs=False)
    assert warm.warm() == 5 and warm.captured == 5  # 64, 128, 256, 512, 1024
    assert warm.acquire(1000).capacity == 1024 and warm.captured == 5  # taken from the idle ones


def test_greedy_identical_with_static_decoders_and_without(tiny):
    full = load_full(tiny)
    runs = []
    for pool in (None, DecoderPool(full, graphs=False)):
        stepper = FullStepper(full, len(PROMPT) + 30, pool)
        ids, tokens = torch.tensor([PROMPT]), []
        for _ in range(30):
            logits = stepper.step(ids).logits
            tokens.append(int(logits.argmax()))
            ids = torch.tensor([[tokens[-1]]])
        stepper.close()
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_trunk_backward_matches_hf_gradients(tiny):
    """Parameter and input gradients of the trunk (blocks 2-9) under a language-model loss, against HF's."""
    ids = torch.tensor([PROMPT + [464, 2068, 7586]])
    hf = load_hf_model(tiny.path)  # eval(): no dropout, like ours
    seen = {}

    def keep_input(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        seen["h"] = h

    hook = hf.transformer.h[2].register_forward_pre_hook(keep_input, with_kwargs=True)
    logits = hf(ids).logits
    F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    hook.remove()

    parts = load_parts(tiny, "2,10")
    trunk = parts["trunk"].requires_grad_(True)
    x = parts["bottom"](ids).detach().requires_grad_(True)
    assert torch.allclose(x, seen["h"], atol=TOL)
    logits = parts["top"](trunk(x), all_positions=True)
    F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()

    assert float((x.grad - seen["h"].grad).abs().max()) < TOL
    hf_params = dict(hf.named_parameters())
    worst = 0.0
    for name, p in trunk.named_parameters():
        ref = hf_params[f"transformer.{name}"].grad
        ref = ref.t() if p.ndim == 2 else ref  # HF's Conv1D weights are [in, out]
        worst = max(worst, float((p.grad - ref).abs().max()))
    print(f"trunk gradients: max |ours - HF| = {worst:.3g}")
    assert worst < TOL and len(list(trunk.parameters())) == 8 * 12


@pytest.mark.parametrize("layout", ["hub safetensors", "hub pytorch_model.bin", "with lm_head"])
def test_checkpoint_layouts_load_by_name(tiny, tmp_path, layout):
    """The hub's gpt2 files: unprefixed keys, attention-mask buffers, no lm_head, sometimes only a .bin."""
    state = load_file(str(tiny.path / "model.safetensors"))
    n_layer = tiny.config.n_layer
    if layout == "with lm_head":
        state = dict(state) | {"lm_head.weight": state["transformer.wte.weight"].clone()}
    else:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        for i in range(n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 1024, 1024, dtype=torch.uint8))
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny.path / "config.json", d / "config.json")
    if layout == "hub pytorch_model.bin":
        torch.save(state, d / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt2"
    model = resolve_model(str(d), tmp_path)
    got, want = load_full(model), load_full(tiny)
    assert got.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(a, want.state_dict()[k]) for k, a in got.state_dict().items())  # every weight, exactly
    assert got.lm_head.weight is got.wte.weight
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        assert float((got(ids) - want(ids)).abs().max()) < 1e-6
        trunk = load_parts(model, "2,10", ("trunk",))["trunk"]
        assert all(torch.equal(a, want.state_dict()[k]) for k, a in trunk.state_dict().items())
