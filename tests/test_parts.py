"""Split parts against the core's own full model (exactly) and HF's (within float tolerance): logits, caches,
split points, weights loaded."""

from __future__ import annotations

import pytest
import torch

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.parts import Split, load_full, load_parts
from tests.conftest import load_hf_model

PROMPT = [15496, 995, 11, 314, 716, 257, 3303]  # "Hello world, I am a ..."


def _split_logits(parts, caches, ids):
    h = parts["bottom"](ids, caches["bottom"])
    h = parts["trunk"](h, caches["trunk"])
    return parts["top"](h, caches["top"])


@torch.inference_mode()
def _compare(full, parts, decode_steps=32):
    """Max |split - full| over prefill, `decode_steps` greedy steps and a 3-token chunk on a full cache."""
    caches = {k: p.new_cache() for k, p in parts.items()}
    fcache = full.new_cache()
    ids = torch.tensor([PROMPT])
    worst, ref = 0.0, None
    chunks = [ids] + [None] * decode_steps + [torch.tensor([[464, 2068, 7586]])]
    for chunk in chunks:
        if chunk is None:
            chunk = torch.argmax(ref, dim=-1, keepdim=True)
        ref = full(chunk, fcache)
        got = _split_logits(parts, caches, chunk)
        worst = max(worst, float((ref - got).abs().max()))
    assert caches["trunk"].length == len(PROMPT) + decode_steps + 3
    return worst


@pytest.mark.parametrize("split", ["2,10", "1,11", "5,6", "1,2", "10,11"])
def test_split_matches_full_model(tiny, split):
    diff = _compare(load_full(tiny), load_parts(tiny, split))
    print(f"split {split}: max |logit diff| = {diff}")
    assert diff == 0.0


def test_split_matches_full_model_eager(tiny):
    diff = _compare(load_full(tiny, attn="eager"), load_parts(tiny, "3,7", attn="eager"))
    assert diff == 0.0


def test_split_sdpa_vs_eager_close(tiny):
    diff = _compare(load_full(tiny), load_parts(tiny, "2,10", attn="eager"), decode_steps=5)
    assert 0.0 < diff < 1e-4  # two kernels: close, and not the same code by accident


def test_eager_attention_matches_hf_eager(tiny):
    hf = load_hf_model(tiny.path, "eager")
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        diff = (hf(ids).logits - load_full(tiny, attn="eager")(ids, all_positions=True)).abs().max()
    assert float(diff) < 1e-5


def test_parts_in_eval_mode_and_deterministic(tiny):
    parts = load_parts(tiny, "2,10")
    assert all(not m.training for p in parts.values() for m in p.modules())
    a = _split_logits(parts, {k: p.new_cache() for k, p in parts.items()}, torch.tensor([PROMPT]))
    b = _split_logits(parts, {k: p.new_cache() for k, p in parts.items()}, torch.tensor([PROMPT]))
    assert torch.equal(a, b)


def test_parts_load_only_their_weights(tiny):
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    names = {n for n, _ in trunk.named_parameters()}
    assert not any("wte" in n or "wpe" in n or "lm_head" in n for n in names)
    assert len(trunk.h) == 8 and "h.2.attn.c_attn.weight" in names and "h.9.mlp.c_proj.bias" in names  # HF names
    client = load_parts(tiny, "2,10", ("bottom", "top"))
    assert len(client["bottom"].h) == 2 and len(client["top"].h) == 2
    # the LM head is tied to the token embedding: one tensor, not two
    assert client["top"].lm_head.weight.data_ptr() == client["bottom"].wte.weight.data_ptr()


@torch.inference_mode()
def test_parts_half_precision(tiny, full_model):
    parts = load_parts(tiny, "2,10", dtype=torch.bfloat16)
    caches = {k: p.new_cache() for k, p in parts.items()}
    got = _split_logits(parts, caches, torch.tensor([PROMPT]))
    assert got.dtype == torch.bfloat16 and caches["trunk"].k[0].dtype == torch.bfloat16
    ref = full_model(torch.tensor([PROMPT])).logits[:, -1]
    assert float((ref - got.float()).abs().max()) < 0.1


@pytest.mark.parametrize("bad", ["0,10", "2,2", "10,2", "2,12", "-1,5", "a,b", "2", "1,2,3", ""])
def test_split_points_rejected(bad):
    with pytest.raises(InvalidInput) as e:
        Split.parse(bad, 12)
    assert "0 < s1 < s2 < 12" in str(e.value) or "two integers" in str(e.value)


def test_split_parse_accepts_edges():
    assert Split.parse("1,11", 12) == Split(1, 11)
    assert str(Split.parse(" 2 , 10 ", 12)) == "2,10"


def test_trunk_rejects_bad_hidden(tiny):
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    for bad, msg in [
        (torch.zeros(1, 3), "dims"),
        (torch.zeros(1, 0, 64), "empty"),
        (torch.zeros(1, 2, 65), "65"),
        (torch.full((1, 2, 64), float("nan")), "NaN"),
        (torch.zeros(1, 2, 64, dtype=torch.int64), "floating"),
    ]:
        with pytest.raises(InvalidInput, match=msg):
            trunk.check_hidden(bad)


def test_context_overflow_is_limit_error(tiny):
    bottom = load_parts(tiny, "2,10", ("bottom",))["bottom"]
    cache = bottom.new_cache()
    bottom(torch.zeros(1, 1020, dtype=torch.long), cache)
    with pytest.raises(LimitExceeded, match="1025 tokens"):
        bottom(torch.zeros(1, 5, dtype=torch.long), cache)


def test_stateless_trunk_matches_session_trunk(tiny):
    trunk = load_parts(tiny, "2,10", ("trunk",))["trunk"]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 5, 64, generator=g)] + [torch.randn(1, 1, 64, generator=g) for _ in range(4)]
    cache, kv = trunk.new_cache(), None
    for x in xs:
        a = trunk(x, cache)
        b, new = trunk.forward_stateless(x, kv)
        assert not a.requires_grad and not new.requires_grad  # frozen by default: no autograd graph per step
        kv = new if kv is None else torch.cat([kv, new], dim=4)
        assert torch.equal(a, b)
    assert list(kv.shape) == trunk.kv_shape(1, 9)
    with pytest.raises(InvalidInput, match="KV cache has shape"):
        trunk.forward_stateless(xs[1], kv[:, :, :, :2])
