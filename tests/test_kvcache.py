"""The KV cache of the core: room written in place, growth, static room, truncation, rows at their own lengths."""

from __future__ import annotations

import pytest
import torch

from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.kvcache import MIN_ROOM, KVCache


def _kv(rows: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, t, 4, generator=g), torch.randn(rows, 3, t, 4, generator=g)


def _append(cache: KVCache, k, v, row=None):
    past, end = cache.start(row, k.shape[2])
    t = k.shape[2]
    if len(set(past)) == 1:
        out = cache.write(0, k, v, row, past[0], None, end)
    else:
        out = cache.write(0, k, v, row, None, torch.tensor(past)[:, None] + torch.arange(t), end)
    cache.advance(row, k.shape[2])
    return out


@pytest.mark.parametrize("capacity", [0, 5, 300])
def test_cache_holds_what_concatenation_holds(capacity):
    cache = KVCache(1, 2, 3, 4, capacity)
    ref_k = ref_v = None
    for i, t in enumerate([7, 1, 1, 3] + [1] * 150):  # past MIN_ROOM and past the capacity: several regrowths
        k, v = _kv(2, t, i)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], dim=2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], dim=2)
        gk, gv = _append(cache, k, v)
        assert torch.equal(gk, ref_k) and torch.equal(gv, ref_v)
    assert cache.lengths == [ref_k.shape[2]] * 2


def test_no_copy_per_step_when_the_length_is_known():
    cache = KVCache(1, 1, 3, 4, capacity=100)
    _append(cache, *_kv(1, 10, 0))
    ptr = cache.k[0].data_ptr()
    for i in range(90):
        _append(cache, *_kv(1, 1, i + 1))
        assert cache.k[0].data_ptr() == ptr  # written in place: the buffer never moved
    _append(cache, *_kv(1, 1, 99))  # one past the room: grows (doubling) and keeps every value
    assert cache.length == 101 and cache.capacity == 200


def test_doubling_without_a_length_and_the_context_caps_it():
    cache = KVCache(1, 1, 3, 4, max_positions=300)
    rooms = set()
    for i in range(300):
        _append(cache, *_kv(1, 1, i))
        rooms.add(cache.capacity)
    assert rooms == {MIN_ROOM, 2 * MIN_ROOM, 4 * MIN_ROOM, 300}
    with pytest.raises(LimitExceeded, match="301 tokens"):
        cache.start(None, 1)


def test_static_cache_never_moves_and_refuses_past_its_room():
    cache = KVCache(1, 1, 3, 4, capacity=8, growable=False)
    ptr = cache.k[0].data_ptr()
    _append(cache, *_kv(1, 8, 0))
    assert cache.k[0].data_ptr() == ptr
    with pytest.raises(LimitExceeded, match="fixed room of 8"):
        cache.start(None, 1)


def test_truncate_then_write_equals_never_having_written():
    a, b = KVCache(1, 1, 3, 4), KVCache(1, 1, 3, 4)
    k, v = _kv(1, 10, 0)
    _append(a, k, v)
    _append(b, k[:, :, :6], v[:, :, :6])
    a.truncate(6)
    k2, v2 = _kv(1, 3, 1)
    ka, va = _append(a, k2, v2)
    kb, vb = _append(b, k2, v2)
    assert torch.equal(ka, kb) and torch.equal(va, vb) and a.length == b.length == 9
    with pytest.raises(InvalidInput, match="holds 9"):
        a.truncate(10)


def test_rows_at_their_own_positions():
    cache = KVCache(1, 2, 3, 4)
    k0, v0 = _kv(1, 5, 0)
    k1, v1 = _kv(1, 2, 1)
    _append(cache, k0, v0, row=0)
    _append(cache, k1, v1, row=1)
    assert cache.lengths == [5, 2]
    k, v = _kv(2, 1, 2)  # one new position per row, written at 5 and at 2
    ks, _ = _append(cache, k, v)
    assert ks.shape[2] == 6 and cache.lengths == [6, 3]
    assert torch.equal(ks[0, :, :6], torch.cat([k0[0], k[0]], dim=1))
    assert torch.equal(ks[1, :, :3], torch.cat([k1[0], k[1]], dim=1))
    assert torch.equal(cache.device_positions(), torch.tensor([6, 3]))
