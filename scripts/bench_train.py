"""Split learning, measured: time and bytes per training step (split against local, fp32 and fp16 wire, the
server keeping activations or recomputing them), and how far a few hundred steps over the split lower the
held-out perplexity. Starts trunk servers on loopback; prints markdown tables and writes JSON (--json).

    python scripts/bench_train.py                      # trained:kjv (12 blocks, width 128), B x T = 8x128, 8x512
    python scripts/bench_train.py --model random:gpt2  # the GPT-2 small shape (slow on a CPU)
    python scripts/bench_train.py --learn 300          # and 300 steps over the split on new text: the New
                                                       # Testament, which trained:kjv has not seen
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.config import ClientConfig  # noqa: E402
from client.split_engine import SplitEngine  # noqa: E402
from client.split_training import LocalTrainer, Run, SplitTrainer, TrainConfig  # noqa: E402
from scripts.bench import start_server  # noqa: E402
from splitcore.lora import add_lora, twin  # noqa: E402
from splitcore.models import load_tokenizer, resolve_model  # noqa: E402
from splitcore.parts import load_parts  # noqa: E402
from splitcore.presets import NEW_TESTAMENT, kjv_text  # noqa: E402
from splitcore.training import TextData, held_bytes, perplexity  # noqa: E402


def step_table(args, targets: dict[str, str], data: TextData) -> list[dict]:
    """Median ms and bytes per step for each config and shape, configs interleaved."""
    model = resolve_model(args.model, args.models_dir)
    layers = list(range(args.split_s1, args.split_s2))
    settings = TrainConfig(lora_rank=8, lr=1e-3).lora()
    engines = {
        name: SplitEngine(
            ClientConfig(model=args.model, models_dir=args.models_dir, server=target, device="cpu", wire_dtype=wire)
        )
        for name, (target, wire) in targets.items()
    }
    rows = []
    for b, t in args.shapes:
        trainers = {"local (one process)": LocalTrainer(model, layers, settings)}
        trainers |= {name: SplitTrainer(e, settings) for name, e in engines.items()}
        times: dict[str, list[float]] = {n: [] for n in trainers}
        last = {}
        for step in range(args.repeats + 1):
            batch = data.batch(step, b, seed=1)[:, :t]
            for name, tr in trainers.items():
                s = tr.step(step, batch)
                if step:  # the first is a warm-up
                    times[name].append(s.ms)
                last[name] = s
        for name, tr in trainers.items():
            s = last[name]
            rows.append(
                {
                    "batch": f"{b}x{t}",
                    "config": name,
                    "step_ms": statistics.median(times[name]),
                    "server_ms": s.server_ms,
                    "bytes_out": s.bytes_out,
                    "bytes_in": s.bytes_in,
                }
            )
            tr.close()
    for e in engines.values():
        e.close()
    return rows


def learn(args, target: str, text_file: Path) -> dict:
    """args.learn steps over the split from the model as it is, on `text_file`; held-out perplexity before and
    after."""
    engine = SplitEngine(ClientConfig(model=args.learn_model, models_dir=args.models_dir, server=target, device="cpu"))
    cfg = TrainConfig(
        data=str(text_file),
        steps=args.learn,
        batch_size=8,
        block_size=128,
        lora_rank=16,
        lora_alpha=32,
        lr=2e-3,
        eval_every=0,
        eval_batches=16,
        client_train="lora",
        out=tempfile.mkdtemp(prefix="bench-train-"),
    )
    data = TextData.from_path(text_file, engine.encode, cfg.block_size)
    trainer = SplitTrainer(engine, cfg.lora(), cfg.client_train)
    evals, t0 = [], time.perf_counter()
    for ev in Run(trainer, data, cfg, args.learn_model):
        if ev.kind == "eval":
            evals.append(ev.eval_loss)
            print(f"  step {ev.step}: held-out perplexity {perplexity(ev.eval_loss):,.1f}", file=sys.stderr)
    trainer.close()
    engine.close()
    return {
        "model": args.learn_model,
        "steps": args.learn,
        "batch": "8x128",
        "adapter": "LoRA rank 16 on every block (trunk on the server, bottom and top here)",
        "perplexity_before": perplexity(evals[0]),
        "perplexity_after": perplexity(evals[-1]),
        "seconds": time.perf_counter() - t0,
    }


def memory_table(args) -> list[dict]:
    """What a training session of the trunk holds between a batch's forward and its backward, keeping the
    activations against recomputing them (the input only), for each model and shape; counted from what autograd
    saves (held_bytes), in float32 (float16 halves it)."""
    rows = []
    for spec in args.memory_models:
        model = resolve_model(spec, args.models_dir)
        trunk = load_parts(model, (args.split_s1, args.split_s2), ["trunk"])["trunk"]
        part = add_lora(twin(trunk), TrainConfig(lora_rank=8).lora())
        for b, t in args.shapes:
            x = torch.randn(b, t, model.config.n_embd)
            keep, again = held_bytes(part, x), held_bytes(part, x, recompute=True)
            rows.append({"model": spec, "batch": f"{b}x{t}", "keep_bytes": keep, "recompute_bytes": again})
            print(
                f"  memory {spec} {b}x{t}: keep {keep / 2**20:.1f} MiB, recompute {again / 2**20:.1f}", file=sys.stderr
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="trained:kjv")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--shapes", default="8x128,8x512", help="batch x block sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--learn", type=int, default=0, help="also train this many steps over the split and report")
    p.add_argument(
        "--learn-model", default="trained:kjv", help="the model --learn starts from (it trains on the New Testament)"
    )
    p.add_argument(
        "--memory-models", default="trained:kjv,random:gpt2", help="models of the memory table (keep vs recompute)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.memory_models = [m for m in args.memory_models.split(",") if m.strip()]
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s.strip()]
    model = resolve_model(args.model, args.models_dir)
    args.split_s1, args.split_s2 = 2, 10
    text = Path(tempfile.mkdtemp(prefix="kjv-")) / "kjv.txt"
    text.write_text(kjv_text(), encoding="utf-8")
    new_text = text.with_name("new-testament.txt")  # trained:kjv saw only the Old Testament
    new_text.write_text(kjv_text(NEW_TESTAMENT), encoding="utf-8")
    data = TextData.from_path(text, load_tokenizer(model.path).encode, max([t for _, t in args.shapes] or [128]))
    servers = [
        start_server(args.model, args.models_dir, None, []),
        start_server(args.model, args.models_dir, None, ["--train-recompute"]),
    ]
    try:
        (_, keep), (_, recompute) = servers
        targets = {
            "split fp32 wire": (keep, "float32"),
            "split fp16 wire": (keep, "float16"),
            "split fp32, server recomputes": (recompute, "float32"),
        }
        out = {"model": args.model, "steps": step_table(args, targets, data) if args.shapes else []}
        out["memory"] = memory_table(args)
        if args.learn:
            learn_server = start_server(args.learn_model, args.models_dir, None, [])
            servers.append(learn_server)
            out["learn"] = learn(args, learn_server[1], new_text)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nmodel {args.model}, LoRA rank 8 on the trunk's blocks, median of {args.repeats} steps\n")
    if not out["steps"]:
        print("(no step table: --shapes '')")
    print("| B x T | config | ms / step | x local | server ms | bytes out / in per step |")
    print("|---|---|---:|---:|---:|---:|")
    local = {r["batch"]: r["step_ms"] for r in out["steps"] if r["config"].startswith("local")}
    for r in out["steps"]:
        print(
            f"| {r['batch']} | {r['config']} | {r['step_ms']:.0f} | {r['step_ms'] / local[r['batch']]:.2f} | "
            f"{r['server_ms']:.0f} | {r['bytes_out']:,} / {r['bytes_in']:,} |"
        )
    if out["memory"]:
        print("\nheld by a training session between forward and backward (trunk blocks, LoRA rank 8, float32)\n")
        print("| model | B x T | keep activations | recompute (input only) | keep / recompute |")
        print("|---|---|---:|---:|---:|")
        for r in out["memory"]:
            k, c = r["keep_bytes"], r["recompute_bytes"]
            print(f"| {r['model']} | {r['batch']} | {k / 2**20:,.1f} MiB | {c / 2**20:,.1f} MiB | {k / c:.1f} |")
    if "learn" in out:
        lr = out["learn"]
        print(
            f"\n{lr['steps']} steps over the split from {lr['model']} ({lr['adapter']}, {lr['batch']}): held-out "
            f"perplexity {lr['perplexity_before']:,.1f} -> {lr['perplexity_after']:,.1f} in {lr['seconds']:.0f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out | {"command": " ".join(sys.argv)}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
