"""What compressing the parts costs in quality and gains in speed and memory, side by side in one run: for each
model and method, held-out perplexity, greedy agreement with the uncompressed model, weight bytes, and decode
ms/token for the full model and for the split over gRPC (servers on loopback), timed in interleaved rounds. Then
the recovery: a pruned trunk plus a split LoRA trained over the wire. Prints markdown, writes JSON (after each
model) and a plotly HTML of perplexity against sparsity.

    python scripts/bench_compress.py                                   # trained:kjv and random:gpt2, all methods
    python scripts/bench_compress.py --models trained:kjv --prompts 5  # quicker

trained:kjv's perplexity is on the New Testament, text it never saw; random:gpt2's weights are random, so its
perplexity says nothing of quality (its agreement and its timings are the point: GPT-2 small's shapes).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.config import ClientConfig  # noqa: E402
from client.split_engine import SplitEngine  # noqa: E402
from client.split_training import SplitTrainer  # noqa: E402
from server.app import TrunkServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from splitcore.compress import Compression, weight_bytes  # noqa: E402
from splitcore.device import resolve_device, resolve_dtype  # noqa: E402
from splitcore.engine import FullEngine  # noqa: E402
from splitcore.lora import LoraSettings  # noqa: E402
from splitcore.models import load_tokenizer, resolve_model  # noqa: E402
from splitcore.presets import NEW_TESTAMENT, OLD_TESTAMENT, kjv_text  # noqa: E402
from splitcore.sampling import SamplingParams  # noqa: E402
from splitcore.training import TextData, lm_loss, perplexity  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
METHODS = "none,prune:0.1,prune:0.3,prune:0.5,prune:0.6,prune:0.7,prune:0.8,prune:0.9,prune24,int8"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def where(spec: str, args) -> dict:
    """The model settings every engine and server of the run shares."""
    return {"model": spec, "models_dir": args.models_dir, "device": args.device, "dtype": args.dtype}


@torch.no_grad()
def held_out_perplexity(model, windows: torch.Tensor) -> float:
    windows = windows.to(model.device)
    losses = [float(lm_loss(model(w[None], all_positions=True), w[None])) for w in windows]
    return perplexity(sum(losses) / len(losses))


def agreement(engine: FullEngine, prompts: list[list[int]], want: list[list[int]], tokens: int) -> dict:
    """Greedy tokens against the uncompressed model's: the share of positions alike, and of whole generations."""
    same = whole = 0
    for p, w in zip(prompts, want, strict=True):
        got = engine.run(p, tokens, GREEDY).token_ids
        same += sum(a == b for a, b in zip(got, w, strict=False))
        whole += got == w
    return {"token_agreement": same / (tokens * len(prompts)), "identical_generations": whole / len(prompts)}


def interleaved_ms(engines: dict[str, object], prompt: list[int], tokens: int, rounds: int) -> dict[str, float]:
    """Median decode ms/token of each engine, the engines taking turns round by round (so drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            times[name] += engine.run(prompt, tokens, GREEDY).stats.decode_ms
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(spec: str, args, nt: list[int]) -> dict:
    model = resolve_model(spec, args.models_dir)
    block = min(args.block, model.config.n_positions)
    windows = torch.tensor(nt[: args.ppl_windows * block]).view(-1, block)
    step = len(nt) // args.prompts
    prompts = [nt[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
    methods = [Compression.parse(m) for m in args.methods.split(",")]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    full = {str(m): FullEngine(model, device, dtype, compress=str(m)) for m in methods}
    want = [full["none"].run(p, args.tokens, GREEDY).token_ids for p in prompts]
    rows = []
    for m in methods:
        e = full[str(m)]
        row = {"method": str(m), "sparsity": sparsity(e.full), "weight_MiB": weight_bytes(e.full) / 2**20}
        row["perplexity"] = held_out_perplexity(e.full, windows)
        row |= agreement(e, prompts, want, args.tokens) if str(m) != "none" else {"token_agreement": 1.0}
        say(f"{spec} {m}: perplexity {row['perplexity']:.2f}, agreement {row['token_agreement']:.1%}")
        rows.append(row)
    say(f"{spec}: timing the full model, {args.rounds} interleaved rounds")
    ms = interleaved_ms(full, prompts[0], args.timing_tokens, args.rounds)
    servers, split = {}, {}
    try:
        for m in methods:
            cfg = ServerConfig(host="127.0.0.1", port=0, compress=str(m), **where(spec, args))
            servers[str(m)] = srv = TrunkServer(cfg)
            srv.start()
            split[str(m)] = SplitEngine(
                ClientConfig(server=f"127.0.0.1:{srv.port}", compress=str(m), **where(spec, args))
            )
        say(f"{spec}: timing the split over gRPC, {args.rounds} interleaved rounds")
        split_ms = interleaved_ms(split, prompts[0], args.timing_tokens, args.rounds)
    finally:
        for e in split.values():
            e.close()
        for s in servers.values():
            s.stop(0.5)
    for row in rows:
        name = row["method"]
        row |= {"full_ms": ms[name], "full_x": ms["none"] / ms[name]}
        row |= {"split_ms": split_ms[name], "split_x": split_ms["none"] / split_ms[name]}
    return {"model": spec, "block": block, "ppl_tokens": windows.numel(), "rows": rows}


def sparsity(model) -> float:
    """Zeros among the blocks' linear weights (int8 ones count by their int8 values)."""
    zeros = total = 0
    for name, mod in model.named_modules():
        if name.count(".") == 3 and name.startswith("h."):
            mod = getattr(mod, "linear", mod)  # int8: the row-by-row wrapper's
            w = mod.weight() if callable(mod.weight) else mod.weight
            w = w.int_repr() if w.is_quantized else w
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total if total else 0.0


def rises_10(rows: list[dict]) -> float | None:
    """The pruning fraction at which perplexity is 10% above the uncompressed, interpolated between grid points."""
    base = rows[0]["perplexity"]
    grid = [(0.0, base)] + [(r["sparsity"], r["perplexity"]) for r in rows if r["method"].startswith("prune:")]
    for (p0, y0), (p1, y1) in zip(grid, grid[1:], strict=False):
        if y1 >= 1.1 * base:
            return p0 + (p1 - p0) * (1.1 * base - y0) / (y1 - y0) if y1 != y0 else p1
    return None


def split_lora(spec: str, compress: str, args, nt: list[int]) -> dict:
    """A server and a client, both compressed by `compress`, train a split LoRA (the trunk's on the server, the
    client's own blocks' here) on the Old Testament, the model's own text: New Testament perplexity before and
    after."""
    cfg = ServerConfig(host="127.0.0.1", port=0, compress=compress, **where(spec, args))
    srv = TrunkServer(cfg)
    srv.start()
    try:
        engine = SplitEngine(ClientConfig(server=f"127.0.0.1:{srv.port}", compress=compress, **where(spec, args)))
        block = min(args.block, engine.n_positions)
        data = TextData(torch.tensor(engine.encode(kjv_text(OLD_TESTAMENT))), torch.tensor(nt), block, [])
        windows = torch.tensor(nt[: args.ppl_windows * block]).view(-1, block)
        lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank, lr=args.lr)
        trainer = SplitTrainer(engine, lora, client_train="lora")

        def ppl() -> float:
            return perplexity(sum(trainer.eval_loss(w[None]) for w in windows) / len(windows))

        before, t0 = ppl(), time.perf_counter()
        for step in range(1, args.recover_steps + 1):
            loss = trainer.step(step, data.batch(step, args.batch, 0)).loss
            if step % 50 == 0:
                say(f"split LoRA over {compress}: step {step}/{args.recover_steps}, loss {loss:.3f}")
        result = {"compress": compress, "perplexity_before": before, "train_s": time.perf_counter() - t0}
        result["perplexity_after"] = ppl()
        trainer.close()
        engine.close()
    finally:
        srv.stop(0.5)
    return result


def recover(spec: str, prune: str, args, nt: list[int]) -> dict:
    """The same split LoRA recipe over the pruned model and, as the control, over the uncompressed one: the LoRA
    also fits the model better to the text whatever the pruning, so what it recovers is read against the control."""
    pruned, control = split_lora(spec, prune, args, nt), split_lora(spec, "none", args, nt)
    lost = pruned["perplexity_before"] - control["perplexity_before"]
    left = pruned["perplexity_after"] - control["perplexity_after"]
    settings = {"steps": args.recover_steps, "rank": args.rank, "lr": args.lr, "batch": args.batch}
    return {**settings, "pruned": pruned, "control": control, "recovered_share": 1 - left / lost if lost else None}


def markdown(result: dict) -> str:
    out = [
        f"### {result['model']} (perplexity over {result['ppl_tokens']:,} held-out tokens)",
        "",
        "| method | sparsity | weights MiB | perplexity | agreement | identical | full ms/tok | x | split ms/tok | x |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        same = f"{r['identical_generations']:.0%}" if "identical_generations" in r else "-"
        out.append(
            f"| {r['method']} | {r['sparsity']:.0%} | {r['weight_MiB']:.1f} | {r['perplexity']:.2f} | "
            f"{r['token_agreement']:.1%} | {same} | {r['full_ms']:.2f} | {r['full_x']:.2f} | {r['split_ms']:.2f} | "
            f"{r['split_x']:.2f} |"
        )
    return "\n".join(out)


def recovery_markdown(r: dict) -> str:
    p, c = r["pruned"], r["control"]
    share = "-" if r["recovered_share"] is None else f"{r['recovered_share']:.0%}"
    return "\n".join(
        [
            f"{r['steps']} split LoRA steps (rank {r['rank']}, lr {r['lr']:g}, batch {r['batch']}), New Testament "
            f"perplexity before -> after; recovered: {share} of what pruning lost, against the control",
            "",
            "| model | before | after | train s |",
            "|---|---:|---:|---:|",
            f"| {p['compress']} | {p['perplexity_before']:.2f} | {p['perplexity_after']:.2f} | {p['train_s']:.0f} |",
            f"| none (control) | {c['perplexity_before']:.2f} | {c['perplexity_after']:.2f} | {c['train_s']:.0f} |",
        ]
    )


def plot(results: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for res in results:
        rows = [r for r in res["rows"] if r["method"] == "none" or r["method"].startswith("prune:")]
        base = rows[0]["perplexity"]
        fig.add_scatter(
            x=[r["sparsity"] for r in rows],
            y=[r["perplexity"] / base for r in rows],
            mode="lines+markers",
            name=f"{res['model']} prune:P",
        )
        for r in res["rows"]:
            if r["method"] in ("prune24", "int8"):
                fig.add_scatter(
                    x=[r["sparsity"]], y=[r["perplexity"] / base], mode="markers", name=f"{res['model']} {r['method']}"
                )
    fig.add_hline(y=1.1, line_dash="dot", annotation_text="+10%")
    fig.update_layout(
        title="Held-out perplexity against sparsity (x uncompressed)",
        xaxis_title="sparsity of the blocks' linear weights",
        yaxis_title="perplexity / uncompressed",
        yaxis_type="log",
    )
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="trained:kjv,random:gpt2")
    p.add_argument("--methods", default=METHODS, help="comma-separated --compress values; the first must be none")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--prompts", type=int, default=20, help="prompts for the agreement, from the New Testament")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt compared")
    p.add_argument("--block", type=int, default=128, help="tokens per perplexity window")
    p.add_argument("--ppl-windows", type=int, default=100, help="held-out windows (100 x 128 = 12,800 tokens)")
    p.add_argument("--timing-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--recover-steps", type=int, default=200, help="split LoRA steps over a pruned trunk (0: none)")
    p.add_argument("--recover-models", default="trained:kjv", help="models whose pruned trunk a split LoRA recovers")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: the full models, servers and clients alike")
    p.add_argument("--dtype", default="float32", help="float32 (int8 on the CPU needs it), float16, bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / f"compress-{time.strftime('%Y-%m-%d')}.json"))
    args = p.parse_args()
    if args.methods.split(",")[0] != "none":
        p.error("--methods must start with none: everything is compared with it")
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    record = {
        "command": " ".join(sys.argv),
        "commit": commit.strip(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    say("reading the New Testament (held out) ...")
    nt_text = kjv_text(NEW_TESTAMENT)
    for spec in args.models.split(","):
        nt = load_tokenizer(resolve_model(spec, args.models_dir).path).encode(nt_text)
        result = bench_model(spec, args, nt)
        result["rises_10pct_at"] = rises_10(result["rows"])
        if args.recover_steps and spec in args.recover_models.split(","):
            base = result["rows"][0]["perplexity"]
            pruned = [r for r in result["rows"] if r["method"].startswith("prune:")]
            past = next((r for r in pruned if r["perplexity"] >= 1.1 * base), pruned[-1])
            say(f"recovery: {args.recover_steps} split LoRA steps over a trunk pruned by {past['method']}")
            result["recovery"] = recover(spec, past["method"], args, nt)
        record["models"].append(result)
        out.write_text(json.dumps(record, indent=1))
        print(markdown(result), flush=True)
        if "recovery" in result:
            print("\n" + recovery_markdown(result["recovery"]), flush=True)
        print(f"\nperplexity +10% at sparsity {result['rises_10pct_at']}\n", flush=True)
    plot(record["models"], out.with_suffix(".html"))
    say(f"wrote {out} and {out.with_suffix('.html')}")


if __name__ == "__main__":
    main()
