"""The tensor codec and the generated stubs."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch

from splitcomm.codec import CodecError, decode, encode
from splitcomm.proto import trunk_pb2 as pb
from tests.conftest import ROOT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_codec_roundtrip(dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    msg = encode(t)
    back = decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert len(msg.data) == t.numel() * t.element_size()


def test_codec_roundtrip_noncontiguous_and_empty():
    t = torch.arange(24.0).reshape(4, 6).t()
    assert torch.equal(decode(encode(t)), t)
    e = torch.empty(1, 0, 8)
    assert decode(encode(e)).shape == (1, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_codec_finite_check(dtype, bad):
    t = torch.randn(2, 3, 4).to(dtype)
    assert torch.equal(decode(encode(t), finite="hidden states"), t)  # finite values pass
    t[1, 2, 3] = bad
    assert decode(encode(t)).isnan().any() or decode(encode(t)).isinf().any()  # unchecked: passes as sent
    with pytest.raises(CodecError, match="NaN or infinite values in hidden states"):
        decode(encode(t), finite="hidden states")
    big = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min, torch.finfo(dtype).tiny]).to(dtype)
    assert torch.equal(decode(encode(big), finite="x"), big)  # extremes are finite


def test_codec_decoded_tensor_is_writable_and_owned():
    msg = encode(torch.zeros(3))
    t = decode(msg)
    t += 1  # no warning about a read-only buffer, and the message is untouched
    assert torch.equal(decode(msg), torch.zeros(3))


def test_codec_view_without_copy():
    msg = encode(torch.arange(6.0).reshape(2, 3))
    view, owned = decode(msg, copy=False), decode(msg)
    assert torch.equal(view, owned) and view.shape == (2, 3)
    owned += 1  # the copy is the caller's own
    assert torch.equal(decode(msg, copy=False), torch.arange(6.0).reshape(2, 3))


def test_codec_cast_on_encode():
    t = torch.randn(1, 1, 768)
    msg = encode(t, torch.float16)
    assert msg.dtype == pb.FLOAT16 and len(msg.data) == 768 * 2
    assert torch.allclose(decode(msg).float(), t, atol=1e-2)


@pytest.mark.parametrize("wire", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src", [torch.float32, torch.float16])
def test_codec_numpy_arrays_encode_as_tensors_do(src, wire):
    """The per-step path encodes the runtime's numpy rows: the same message as from the tensor."""
    t = torch.randn(1, 1, 64).to(src)
    assert encode(t.numpy(), wire) == encode(t, wire)


def test_codec_numpy_array_without_a_wire_dtype():
    import numpy as np

    with pytest.raises(CodecError, match="cannot cross the wire"):
        encode(np.zeros(3))  # float64


def test_codec_little_endian_bytes():
    assert encode(torch.tensor([1.0])).data == bytes.fromhex("0000803f")


@pytest.mark.parametrize(
    "msg,match",
    [
        (pb.Tensor(data=b"\0" * 4, shape=[1], dtype=0), "unknown or unset"),
        (pb.Tensor(data=b"\0" * 4, shape=[1], dtype=99), "unknown or unset"),
        (pb.Tensor(data=b"\0" * 4, shape=[2], dtype=pb.FLOAT32), "needs 8"),
        (pb.Tensor(data=b"\0" * 3, shape=[1], dtype=pb.FLOAT32), "3 bytes"),
        (pb.Tensor(data=b"", shape=[-1, 4], dtype=pb.FLOAT32), "negative"),
        (pb.Tensor(data=b"", shape=[1 << 40, 1 << 40], dtype=pb.FLOAT32), "limit"),
        (pb.Tensor(data=b"", shape=[1] * 9, dtype=pb.FLOAT32), "dims"),
        (pb.Tensor(data=b"", shape=[0, 2**62, 2**31], dtype=pb.FLOAT32), "limit"),  # found by the fuzz test
    ],
)
def test_codec_rejects_malformed(msg, match):
    with pytest.raises(CodecError, match=match):
        decode(msg)


def test_stubs_match_proto():
    """The checked-in stubs are exactly what scripts/gen_protos.py makes from protos/trunk.proto."""
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with tempfile.TemporaryDirectory() as tmp:
        for f in gen.generate(Path(tmp)):
            checked_in = ROOT / "splitcomm" / "proto" / f.name
            assert checked_in.read_text() == f.read_text(), f"{checked_in} is stale: run scripts/gen_protos.py"
