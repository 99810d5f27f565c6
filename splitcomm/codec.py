"""The one place tensors become wire messages and back: raw little-endian bytes, shape and dtype."""

from __future__ import annotations

import math
import sys

import torch

from splitcomm.proto import trunk_pb2 as pb

if sys.byteorder != "little":  # raw bytes on the wire are little-endian; torch uses the host order
    raise ImportError("splitcomm.codec supports little-endian hosts only")

MAX_DIMS = 8  # more than any tensor of this protocol needs: [blocks, 2, batch, heads, seq, head_dim]

_TO_WIRE = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16, torch.int64: pb.INT64}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """A Tensor message that does not describe a valid tensor."""


def parse_wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise CodecError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got '{name}'")
    return WIRE_DTYPES[name]


def encode(t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Tensor -> message, optionally cast to `dtype` first (e.g. float16 to halve the bytes)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in _TO_WIRE:
        raise CodecError(f"dtype {t.dtype} cannot cross the wire; use one of {list(_TO_WIRE)}")
    data = t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(data=data, shape=list(t.shape), dtype=_TO_WIRE[t.dtype])


def decode(msg: pb.Tensor, max_elements: int = 1 << 31) -> torch.Tensor:
    """Message -> tensor, checking dtype, shape and byte count first; never trusts the sender."""
    if msg.dtype not in _FROM_WIRE:
        raise CodecError(
            f"unknown or unset tensor dtype {msg.dtype}; expected one of "
            f"{', '.join(pb.DType.Name(d) for d in _FROM_WIRE)}"
        )
    dtype = _FROM_WIRE[msg.dtype]
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"tensor has {len(shape)} dims, at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor shape {shape} has a negative dimension")
    n = math.prod(shape)  # Python ints: no overflow
    if n > max_elements or math.prod(max(d, 1) for d in shape) > max_elements:  # [0, 2**62] is absurd too
        raise CodecError(f"tensor shape {shape} has {n} elements, more than the limit of {max_elements}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise CodecError(
            f"tensor data is {len(msg.data)} bytes, but shape {shape} of "
            f"{pb.DType.Name(msg.dtype)} needs {n * itemsize}"
        )
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    # frombuffer shares the message's immutable bytes; clone so the tensor owns writable memory
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")
