"""The one place tensors become wire messages and back: raw little-endian bytes, shape and dtype."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from splitcomm.proto import trunk_pb2 as pb
from splitcore.errors import InvalidInput

if sys.byteorder != "little":  # raw bytes on the wire are little-endian; torch uses the host order
    raise ImportError("splitcomm.codec supports little-endian hosts only")

MAX_DIMS = 8  # more than any tensor of this protocol needs: [blocks, 2, batch, heads, seq, head_dim]

_TO_WIRE = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16, torch.int64: pb.INT64}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
# The raw bytes go through numpy: its calls cost a fraction of torch's dispatches on the per-step hot path
# (measured on the server, cold caches: decode + checks 0.18 -> 0.08 ms). numpy has no bfloat16, so its
# bits are read as uint16 and viewed as bfloat16 by torch.
_NUMPY = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.BFLOAT16: np.uint16, pb.INT64: np.int64}
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The one table of the float dtypes numpy computes with: a hidden state of these stays a numpy array from the
# message's bytes to the trunk's input buffer, and from its output rows back to bytes.
NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16}
_NUMPY_WIRES = {_TO_WIRE[t]: n for t, n in NUMPY_FLOATS.items()}
_FROM_NUMPY = {np.dtype(n): _TO_WIRE[t] for t, n in NUMPY_FLOATS.items()}
_ITEMSIZE = {w: np.dtype(v).itemsize for w, v in _NUMPY.items()}
WIRE_NAMES = {w: pb.DType.Name(w) for w in pb.DType.values()}  # for messages, without a lookup per step


class CodecError(InvalidInput):
    """A Tensor message that does not describe a valid tensor (INVALID_ARGUMENT, as any InvalidInput)."""


def wire_torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype of a wire dtype (one `decode` accepts)."""
    return _FROM_WIRE[wire]


def parse_wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise CodecError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got '{name}'")
    return WIRE_DTYPES[name]


def encode(t: torch.Tensor | np.ndarray, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Tensor -> message, optionally cast to `dtype` first (e.g. float16 to halve the bytes). A float32 or float16
    numpy array goes as well (the per-step path's outputs), to a float32 or float16 wire."""
    if isinstance(t, np.ndarray):
        wire = _TO_WIRE.get(dtype) if dtype is not None else _FROM_NUMPY.get(t.dtype)
        if wire in _NUMPY_WIRES and t.dtype in _FROM_NUMPY:
            return _encode_array(t, wire)
        t = torch.from_numpy(t)  # to bfloat16 (which numpy lacks), or an error below
    wire = _TO_WIRE.get(dtype or t.dtype)
    if wire is None:
        raise CodecError(f"dtype {dtype or t.dtype} cannot cross the wire; use one of {list(_TO_WIRE)}")
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if wire in _NUMPY_WIRES and t.dtype in NUMPY_FLOATS:  # numpy casts at a fraction of the cost
        return _encode_array(t.numpy(), wire)
    if t.dtype != (dtype or t.dtype):
        t = t.to(dtype)
    if wire == pb.BFLOAT16:
        t = t.view(torch.int16)  # numpy has no bfloat16: its bits travel as they are
    data = t.numpy().tobytes() if t.numel() else b""  # tobytes() writes C order whatever the strides
    return pb.Tensor(data=data, shape=t.shape, dtype=wire)


def decode(msg: pb.Tensor, max_elements: int = 1 << 31, finite: str | None = None, copy: bool = True) -> torch.Tensor:
    """Message -> tensor, checking dtype, shape and byte count first; never trusts the sender.

    With `finite` (what the tensor is, e.g. "hidden states"), NaN or infinite values are rejected too.
    `copy=False` returns a view of the message's bytes, for a caller that only reads it (saves a copy of a
    multi-megabyte stateless KV cache); it must never be written to."""
    return _tensor(_array(msg, max_elements, finite), msg.dtype, copy)


def decode_hidden(msg: pb.Tensor, max_elements: int = 1 << 31) -> np.ndarray | torch.Tensor:
    """A step's hidden states as they arrive (checked, finite), decoded once: for a float32/float16 wire a
    read-only numpy view of the message's bytes, which the trunk stages as it is (the per-step hot path, where
    numpy's calls cost a fraction of torch's); for bfloat16 a tensor of its own. Any other dtype comes as an
    array, for the caller's check to refuse."""
    a = _array(msg, max_elements, "hidden states")
    return _tensor(a, msg.dtype, copy=True) if msg.dtype == pb.BFLOAT16 else a


def _tensor(a: np.ndarray, wire: int, copy: bool = True) -> torch.Tensor:
    """What `_array` gave -> a tensor of the wire's dtype: a copy it owns, or (`copy=False`) a read-only view."""
    if copy:
        t = torch.from_numpy(a.copy())
    else:
        with warnings.catch_warnings():  # torch warns that the array is not writable: the caller only reads
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if wire == pb.BFLOAT16 else t


def _array(msg: pb.Tensor, max_elements: int = 1 << 31, finite: str | None = None) -> np.ndarray:
    """Message -> a read-only numpy view of its bytes, shaped, with `decode`'s checks. bfloat16 comes as its uint16
    bits."""
    np_dtype = _NUMPY.get(msg.dtype)
    if np_dtype is None:
        raise CodecError(
            f"unknown or unset tensor dtype {msg.dtype}; expected one of "
            f"{', '.join(pb.DType.Name(d) for d in _FROM_WIRE)}"
        )
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"tensor has {len(shape)} dims, at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise CodecError(f"tensor shape {list(shape)} has a negative dimension")
    n = math.prod(shape)  # Python ints: no overflow
    if n > max_elements or (n == 0 and math.prod(max(d, 1) for d in shape) > max_elements):  # [0, 2**62] too
        raise CodecError(f"tensor shape {list(shape)} has {n} elements, more than the limit of {max_elements}")
    data = msg.data  # read once: each read of a bytes field makes a bytes object
    if len(data) != n * _ITEMSIZE[msg.dtype]:
        raise CodecError(
            f"tensor data is {len(data)} bytes, but shape {list(shape)} of "
            f"{pb.DType.Name(msg.dtype)} needs {n * _ITEMSIZE[msg.dtype]}"
        )
    a = np.frombuffer(data, dtype=np_dtype)  # shares the message's immutable bytes
    if finite and not _all_finite(a, msg.dtype):
        raise CodecError(f"NaN or infinite values in {finite}")
    return a.reshape(shape)


def _encode_array(a: np.ndarray, wire: int) -> pb.Tensor:
    """A float32 or float16 array -> message of wire dtype FLOAT32 or FLOAT16 (cast if they differ)."""
    return pb.Tensor(data=a.astype(_NUMPY[wire], copy=False).tobytes(), shape=a.shape, dtype=wire)


def encode_named(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[pb.NamedTensor]:
    """Named tensors (an adapter's weights, an optimizer's state) -> messages, sorted by name."""
    return [pb.NamedTensor(name=k, tensor=encode(v, dtype)) for k, v in sorted(tensors.items())]


def decode_named(items, max_elements: int = 1 << 31, finite: str | None = None) -> dict[str, torch.Tensor]:
    """Messages -> named tensors, each checked as `decode` does (`finite` names what they are)."""
    return {n.name: decode(n.tensor, max_elements, finite and f"{finite} {n.name}") for n in items}


def _all_finite(a: np.ndarray, wire: int) -> bool:
    if wire == pb.INT64:
        return True
    if wire == pb.BFLOAT16:  # exponent bits all set: infinity or NaN
        return not bool(np.any((a & 0x7F80) == 0x7F80))
    return bool(np.isfinite(a).all())


def dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")
