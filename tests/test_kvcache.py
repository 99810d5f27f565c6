"""The growing KV cache: same logits as Hugging Face's concatenating cache, without copying the cache per step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from splitcore.kvcache import MIN_ROOM, GrowingLayer, growing_cache


def _kv(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)


@pytest.mark.parametrize("capacity", [0, 5, 300])
def test_growing_layer_holds_what_concatenation_holds(capacity):
    ref, got = DynamicCache(), growing_cache(capacity)
    chunks = [7, 1, 1, 3] + [1] * 150  # past MIN_ROOM and past the capacity: several regrowths
    for i, t in enumerate(chunks):
        k, v = _kv(t, i)
        rk, rv = ref.update(k, v, 0)
        gk, gv = got.update(k, v, 0)
        assert torch.equal(rk, gk) and torch.equal(rv, gv)
        assert got.get_seq_length() == ref.get_seq_length()
    assert isinstance(got.layers[0], GrowingLayer)


def test_no_copy_per_step_when_the_length_is_known():
    cache = growing_cache(100)
    cache.update(*_kv(10, 0), 0)
    ptr = cache.layers[0].keys.data_ptr()
    for i in range(90):
        cache.update(*_kv(1, i + 1), 0)
        assert cache.layers[0].keys.data_ptr() == ptr  # written in place: the buffer never moved
    cache.update(*_kv(1, 99), 0)  # one past the room: grows (doubling) and keeps every value
    assert cache.get_seq_length() == 101 and cache.layers[0]._k.room == 200


def test_doubling_without_a_length():
    cache = growing_cache()
    rooms = set()
    for i in range(300):
        cache.update(*_kv(1, i), 0)
        rooms.add(cache.layers[0]._k.room)
    assert rooms == {MIN_ROOM, 2 * MIN_ROOM, 4 * MIN_ROOM, 8 * MIN_ROOM}


def test_crop_and_reset_are_taken_over():
    ref, got = DynamicCache(), growing_cache(50)
    for i in range(5):
        k, v = _kv(4, i)
        ref.update(k, v, 0)
        got.update(k, v, 0)
    ref.crop(-3)
    got.crop(-3)
    k, v = _kv(2, 9)
    assert all(torch.equal(a, b) for a, b in zip(ref.update(k, v, 0), got.update(k, v, 0), strict=True))
    got.reset()
    assert got.get_seq_length() == 0
    k, v = _kv(3, 10)
    assert torch.equal(got.update(k, v, 0)[0], k)


def test_full_model_logits_identical_with_either_cache(full_model):
    """The model sees the same keys and values: logits are bitwise equal over a prefill and 40 decode steps."""
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])
    caches = [DynamicCache(), growing_cache(), growing_cache(ids.shape[1] + 40)]
    chunks = [ids] * 3
    with torch.inference_mode():
        for _ in range(41):
            logits = [
                full_model(c, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
                for c, cache in zip(chunks, caches, strict=True)
            ]
            assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
            chunks = [torch.tensor([[int(logits[0].argmax())]])] * 3
