"""Which SDPA kernel to pin: each backend timed on the model's attention shapes, first-seen against repeated lengths.

For every backend torch has on the device (cuDNN, flash, memory-efficient, math), it times:
- prefill: one call per prompt length, each length new, then the same lengths again;
- decode: one query against keys of length L, L growing one at a time as in a generation (fresh), then the same
  run of lengths again (repeated): a backend that plans per shape shows a large fresh / repeated ratio;
- static decode: one query against a fixed room of keys with a mask (the step CUDA graphs capture).
Prints a markdown table and writes JSON (--json). Runs on the CPU too (math and flash there).

    python scripts/bench_attention.py --device cuda --dtype float16 --json bench_results/attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from splitcore.device import DTYPES, resolve_device  # noqa: E402

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _timed(device: torch.device, calls) -> float:
    """Mean ms per call, wall time including the host's share (a plan built on the CPU counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for call in calls:
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / len(calls)


def measure(backend: SDPBackend, device, dtype, heads: int, head_dim: int, start: int, steps: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    room = start + steps + 64

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    k, v = rand(1, heads, room, head_dim), rand(1, heads, room, head_dim)
    q1 = rand(1, heads, 1, head_dim)
    prompts = [start - 7 * i for i in range(1, 6)]  # lengths no other row uses
    qp = {n: rand(1, heads, n, head_dim) for n in prompts}
    mask = (torch.arange(room, device=device) <= start).view(1, 1, 1, room)
    out = {}
    with sdpa_kernel([backend]), torch.inference_mode():
        try:
            F.scaled_dot_product_attention(q1, k[:, :, :8], v[:, :, :8])  # is it there at all?
        except RuntimeError as e:
            return {"error": str(e).splitlines()[0][:120]}

        def prefill(n):
            return lambda: F.scaled_dot_product_attention(qp[n], k[:, :, :n], v[:, :, :n], is_causal=True)

        def decode(n):
            return lambda: F.scaled_dot_product_attention(q1, k[:, :, :n], v[:, :, :n])

        try:
            out["prefill fresh"] = _timed(device, [prefill(n) for n in prompts])
            out["prefill repeated"] = _timed(device, [prefill(n) for n in prompts])
        except RuntimeError as e:
            out["prefill"] = f"unsupported: {str(e).splitlines()[0][:80]}"
        lengths = list(range(start, start + steps))
        out["decode fresh"] = _timed(device, [decode(n) for n in lengths])
        out["decode repeated"] = _timed(device, [decode(n) for n in lengths])
        try:
            static = [lambda: F.scaled_dot_product_attention(q1, k, v, attn_mask=mask)] * steps
            out["static decode (masked)"] = _timed(device, static)
        except RuntimeError as e:
            out["static decode (masked)"] = f"unsupported: {str(e).splitlines()[0][:80]}"
    if isinstance(out.get("decode fresh"), float):
        out["decode fresh / repeated"] = out["decode fresh"] / out["decode repeated"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--start", type=int, default=100, help="key length of the first decode step")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    names = list(BACKENDS) if device.type == "cuda" else ["flash", "math"]
    results = {n: measure(BACKENDS[n], device, dtype, args.heads, args.head_dim, args.start, args.steps) for n in names}
    rows = sorted({k for r in results.values() for k in r})
    what = f"{device} {str(dtype).removeprefix('torch.')}, {args.heads} heads x {args.head_dim}"
    print(f"\nSDPA on {what}; ms per call\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for row in rows:
        cells = [results[n].get(row, "") for n in names]
        print(f"| {row} | " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "cuda": torch.version.cuda}
        args.json.write_text(json.dumps(meta | {"results": results}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
