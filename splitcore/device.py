"""Device, dtype and thread choices shared by every process."""

from __future__ import annotations

import logging
import os
import sys

import torch

from splitcore.errors import InvalidInput

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device '{name}' asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise InvalidInput(f"device must be auto, cpu or cuda[:N], got '{name}'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on a GPU and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidInput(f"dtype must be auto, {', '.join(DTYPES)}; got '{name}'")
    return DTYPES[name]


def use_cuda_graphs(setting: str, device: torch.device) -> bool:
    """'on' (the default) captures decode steps as CUDA graphs on a CUDA device and means nothing elsewhere."""
    if setting not in ("on", "off"):
        raise InvalidInput(f"cuda graphs must be 'on' or 'off', got '{setting}'")
    return setting == "on" and device.type == "cuda"


def configure_attention(device: torch.device) -> str:
    """Pin the attention kernels on CUDA and say which: cuDNN's SDPA builds an execution plan per new key length
    (~35 ms of CPU per decode step of every fresh generation, measured on an H100), so it is switched off and
    torch picks among flash, memory-efficient and math, which have no per-shape plans. `scripts/bench_attention.py`
    measures each backend. Returns a line for the logs."""
    if device.type != "cuda":
        return "attention: SDPA on the CPU"
    if os.environ.get("GPT2_SDPA_CUDNN", "0") == "1":
        return "attention: SDPA with cuDNN allowed (GPT2_SDPA_CUDNN=1)"
    torch.backends.cuda.enable_cudnn_sdp(False)
    return "attention: SDPA flash / memory-efficient / math; cuDNN off (a plan per key length stalls decode)"


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0 keeps torch's default) and return what is in force.

    Entry points set OMP_WAIT_POLICY=PASSIVE before torch loads: with the default spin-wait, a client and a
    trunk sharing cores starve each other while each waits for the other (measured: +33% per token)."""
    if threads:
        if threads < 1:
            raise InvalidInput(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    logger.info("torch threads: %d, OMP_WAIT_POLICY=%s", n, os.environ.get("OMP_WAIT_POLICY", "(unset)"))
    return n


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the operating system too (Linux: what `top -H`, /proc/PID/task/TID/comm and
    bench_server's per-thread CPU column show; at most 15 bytes). Python < 3.14 names only its own Thread object.
    Does nothing where it cannot."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
