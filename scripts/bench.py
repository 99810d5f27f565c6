"""Split against full, side by side in one run: TTFT, per-token latency, tokens/s, bytes per token, ratios.

Starts a trunk server on loopback (a separate process, as in a deployment), then for each prompt length runs
greedy generation on the full model and on each split configuration, interleaved, several times. Prints a
markdown table, writes JSON (--json) and a plotly chart of latency against context length (--plot).

    python scripts/bench.py                 # random:gpt2 (GPT-2 small shape), prompts of 8/64/128/512 tokens
    python scripts/bench.py --quick         # under a minute
    python scripts/bench.py --profile       # where a decode step's time goes, part by part
    python scripts/bench.py --device cuda --dtype float16   # on a GPU, the trunk server on the same GPU

Each prompt length is new to every engine when its first run starts (the warm-up uses another length), so the
first run's decode median against the later runs' shows any cost of a first-seen length (`fresh / repeat`).
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
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.config import ClientConfig  # noqa: E402
from client.split_engine import SplitEngine  # noqa: E402
from splitcomm.links import SessionLink  # noqa: E402
from splitcore.device import resolve_device, resolve_dtype, use_cuda_graphs  # noqa: E402
from splitcore.engine import Engine, FullEngine  # noqa: E402
from splitcore.models import resolve_model  # noqa: E402
from splitcore.sampling import SamplingParams  # noqa: E402
from splitcore.settings import DEFAULT_SPLIT  # noqa: E402
from splitcore.stats import GenerationStats, percentile  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
TEXT = (
    "The history of natural language processing generally started in the 1950s, although work can be found from "
    "earlier periods. In 1950, Alan Turing published an article titled Computing Machinery and Intelligence which "
    "proposed what is now called the Turing test as a criterion of intelligence. "
)


@dataclass
class Config:
    name: str
    engine: Engine
    split: bool = True
    speculate: str = "none"  # a draft source: greedy tokens verified several to a round trip
    plain: str = ""  # the config without speculation that this one is compared with


@dataclass
class Result:
    config: str
    prompt_tokens: int
    runs: list[GenerationStats] = field(default_factory=list)

    def summary(self) -> dict:
        decode = [t for r in self.runs for t in r.decode_ms]
        d = {
            "config": self.config,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.runs[0].tokens),
            "repeats": len(self.runs),
            "ttft_ms": statistics.median(r.ttft_ms for r in self.runs),
            "decode_median_ms": percentile(decode, 50),
            "decode_p90_ms": percentile(decode, 90),
            "decode_p99_ms": percentile(decode, 99),
            "tokens_per_s": statistics.fmean(r.tokens_per_s for r in self.runs),
            "first_run_decode_median_ms": percentile(self.runs[0].decode_ms, 50),
        }
        spec = [r.speculation for r in self.runs if r.speculation is not None]
        if spec:
            d["speculation"] = {
                "acceptance_rate": statistics.fmean(x.acceptance for x in spec),
                "tokens_per_round_trip": statistics.fmean(
                    len(r.tokens) / r.speculation.rounds for r in self.runs if r.speculation.rounds
                ),
                "mean_draft_length": statistics.fmean(x for r in spec for x in r.lengths)
                if any(r.lengths for r in spec)
                else 0.0,
            }
        if len(self.runs) > 1:
            d["repeat_decode_median_ms"] = percentile([t for r in self.runs[1:] for t in r.decode_ms], 50)
            d["fresh_vs_repeat"] = d["first_run_decode_median_ms"] / d["repeat_decode_median_ms"]
        toks = [t for r in self.runs for t in r.tokens[1:]]
        if toks and toks[0].server_ms is not None:
            d |= {
                # means: a speculative round's bytes are booked on its first token
                "bytes_out_per_token": statistics.fmean(t.bytes_out for t in toks),
                "bytes_in_per_token": statistics.fmean(t.bytes_in for t in toks),
                "bytes_out_first_last": [toks[0].bytes_out, toks[-1].bytes_out],
                "client_ms": statistics.median(t.client_ms for t in toks),
                "server_ms": statistics.median(t.server_ms for t in toks),
                "network_ms": statistics.median(t.network_ms for t in toks),
            }
        return d


def numbers(kind: type, least: float = 0, empty: bool = False):
    """An argparse type: comma-separated numbers of `kind`, each >= `least` (a bad value is argparse's one-line
    error, not a traceback); `empty` allows none."""

    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got '{text}'") from None
        if any(v < least for v in values) or not (values or empty):
            some = "" if empty else "one or more "
            raise argparse.ArgumentTypeError(f"expected {some}values >= {least:g}, got '{text}'")
        return values

    return parse


def prompt_ids(engine: Engine, n: int) -> list[int]:
    ids = engine.encode(TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def tree_at(rev: str) -> Path:
    """The repository's files at `rev` (git archive), in a directory of bench_results/ of its own."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=ROOT)
    if sha.returncode:
        raise SystemExit(f"--against: no such revision '{rev}' ({sha.stderr.strip()})")
    out = ROOT / "bench_results" / f"tree-{sha.stdout.strip()}"
    if not out.is_dir():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], capture_output=True, cwd=ROOT, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def start_server(
    model: str,
    models_dir: str,
    threads: int | None,
    device: list[str],
    entry: tuple[str, ...] = ("-m", "server"),
    root: Path = ROOT,
) -> tuple[subprocess.Popen, str]:
    """A trunk server in a process of its own on 127.0.0.1 and a free port: (process, target). `entry` runs
    another entry point with the same flags (scripts/simulated_server.py); `root` another tree's code (--against)."""
    cmd = [
        sys.executable,
        *entry,
        "--model",
        model,
        "--models-dir",
        models_dir,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-file",
        str(ROOT / "logs" / ("bench_server.log" if root == ROOT else f"bench_server_{root.name}.log")),
        "--idle-timeout",
        "0",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += device
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)  # keep what's there
    env = dict(os.environ, PYTHONPATH=path)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    line = p.stdout.readline()
    if "ready on" not in line:
        p.kill()
        raise SystemExit(f"trunk server did not start: {line!r} (see logs/bench_server.log)")
    return p, "127.0.0.1:" + line.split("127.0.0.1:")[1].split(":")[0]


@torch.inference_mode()
def wire_agreement(ref: SplitEngine, other: SplitEngine, ids: list[int], n: int) -> tuple[float, int, int]:
    """Step two engines in lockstep along ref's greedy path: (max |logit diff|, argmax agreements, steps)."""
    a, b = ref.new_stepper(len(ids) + n), other.new_stepper(len(ids) + n)
    chunk, worst, agree = torch.tensor([ids]), 0.0, 0
    try:
        for _ in range(n):
            la, lb = a.step(chunk).logits.float(), b.step(chunk).logits.float()
            worst = max(worst, float((la - lb).abs().max()))
            agree += int(la.argmax()) == int(lb.argmax())
            chunk = torch.tensor([[int(la.argmax())]])
    finally:
        a.close()
        b.close()
    return worst, agree, n


PROFILE_PARTS = [
    ("bottom", "client: embeddings + bottom blocks"),
    ("trunk", "trunk compute"),
    ("server_handling", "server: decode, checks, encode"),
    ("transport", "gRPC transport, both ways"),
    ("codec", "client: encode + decode"),
    ("top", "client: top blocks"),
    ("head", "client: final norm + LM head"),
    ("other", "the rest: argmax, stepper and link overhead"),
    ("total", "total per token"),
]


@torch.inference_mode()
def profile_steps(engine: Engine, ids: list[int], n: int) -> list[dict[str, float]]:
    """Greedy decode of n tokens after the prompt; for every decode step, ms in each part (adding up to total)."""
    steps = []
    stepper = engine.new_stepper(len(ids) + n)
    chunk = torch.tensor([ids])
    try:
        for i in range(n):
            t0 = time.perf_counter()
            r = stepper.step(chunk)
            token = int(r.logits.argmax())
            total = (time.perf_counter() - t0) * 1e3
            chunk = torch.tensor([[token]])
            if i == 0:  # the prefill
                continue
            step = {"total": total}
            if r.server_ms is not None:  # a split: the full model is one piece
                step |= {"bottom": stepper.last_bottom_ms, "top": stepper.last_top_ms, "head": stepper.last_head_ms}
                last = stepper.link.session.last if isinstance(stepper.link, SessionLink) else None
                if last is None:  # trunk in-process
                    step["trunk"] = r.trunk_wall_ms
                else:
                    step |= {
                        "trunk": last.server_ms,
                        "server_handling": last.server_handling_ms,
                        "transport": last.transport_ms,
                        "codec": last.codec_ms,
                    }
                step["other"] = total - sum(v for k, v in step.items() if k != "total")
            steps.append(step)
    finally:
        stepper.close()
    return steps


def profile(configs: list[Config], lengths: list[int], n: int, repeats: int) -> dict:
    """Mean ms of each part of a decode step, per prompt length and config, interleaved like the bench.

    Means, not medians, so that the parts add up to the total; the slowest 5% of steps (a shared machine's
    hiccups) are left out of each config."""
    out = {}
    for length in lengths:
        pooled: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
        for _ in range(repeats):
            for c in configs:
                pooled[c.name] += profile_steps(c.engine, prompt_ids(c.engine, length), n)
        out[length] = {}
        for name, steps in pooled.items():
            cut = percentile([s["total"] for s in steps], 95)
            kept = [s for s in steps if s["total"] <= cut]
            out[length][name] = {k: statistics.fmean(s[k] for s in kept) for k in kept[0]} | {"steps": len(kept)}
    return out


def profile_table(prof: dict) -> str:
    lines = []
    for length, by_config in prof.items():
        names = list(by_config)
        lines += [
            f"\nprompt {length} tokens: mean ms per decode step (slowest 5% left out)",
            "",
            "| part | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for key, label in PROFILE_PARTS:
            cells = [f"{by_config[c][key]:.2f}" if key in by_config[c] else "" for c in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        full = by_config[names[0]]["total"]
        lines.append("| x full | " + " | ".join(f"{by_config[c]['total'] / full:.3f}" for c in names) + " |")
    return "\n".join(lines)


def speculation_table(rows: list[dict], configs: list[Config]) -> str:
    """tokens/s of each speculative row against the plain split at the same delay, with acceptance."""
    plain = {c.name: c.plain for c in configs if c.plain}
    if not plain:
        return ""
    by = {(r["config"], r["prompt_tokens"]): r for r in rows}
    out = [
        "| prompt | config | tok/s | x plain | acceptance | tokens per round trip | mean draft length |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["config"] in plain:
            base = by[(plain[r["config"]], r["prompt_tokens"])]
            s = r["speculation"]
            out.append(
                f"| {r['prompt_tokens']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {s['acceptance_rate']:.2f} | "
                f"{s['tokens_per_round_trip']:.2f} | {s['mean_draft_length']:.2f} |"
            )
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    full = {r["prompt_tokens"]: r for r in rows if r["config"] == "full"}
    out = [
        "| prompt | config | TTFT ms | x full | decode median ms | x full | p90 | p99 | tok/s | bytes/token out / in |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = full[r["prompt_tokens"]]
        b = f"{r['bytes_out_per_token']:,.0f} / {r['bytes_in_per_token']:,.0f}" if "bytes_out_per_token" in r else "-"
        out.append(
            f"| {r['prompt_tokens']} | {r['config']} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / f['ttft_ms']:.2f} | "
            f"{r['decode_median_ms']:.2f} | {r['decode_median_ms'] / f['decode_median_ms']:.3f} | "
            f"{r['decode_p90_ms']:.2f} | {r['decode_p99_ms']:.2f} | {r['tokens_per_s']:.1f} | {b} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = [r for r in rows if r["config"] == name]
        fig.add_scatter(
            x=[r["prompt_tokens"] for r in pts], y=[r["decode_median_ms"] for r in pts], mode="lines+markers", name=name
        )
    fig.update_layout(
        title="Decode latency per token against context length",
        xaxis_title="prompt tokens",
        yaxis_title="median ms per token",
        template="plotly_white",
    )
    fig.write_html(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--split", default=DEFAULT_SPLIT)
    p.add_argument("--prompt-lengths", type=numbers(int, 1), default="8,64,128,512")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--delays",
        type=numbers(float, empty=True),
        default="5,25",
        help="one-way delays (ms) to simulate a remote trunk; '' = none",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads in each process (default: torch's)")
    p.add_argument(
        "--speculate",
        default="",
        help="draft sources to add rows for (lookup,self): each at no delay and at every --delays, against the "
        "plain split at the same delay",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; else every timed run samples (top-k 50, unseeded): speculative rows then use "
        "speculative sampling",
    )
    p.add_argument("--only", default="", help="comma-separated names of split configs to run (full always runs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: the client's and the trunk server's")
    p.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on the CPU), float32, ...")
    p.add_argument("--cuda-graphs", default="on", choices=["on", "off"], help="decode steps as CUDA graphs")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats: under a minute")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison, time each part of a decode step: full model, split with the trunk "
        "in-process, split over gRPC",
    )
    p.add_argument(
        "--against",
        default="",
        metavar="REV",
        help="also a trunk server running the code of git revision REV, and a row through it beside each session "
        "row at no delay: the server before and after a change, side by side in one run",
    )
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--plot", type=Path, default=None, help="write a plotly HTML chart here")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.delays = 16, 1, [25.0]
    lengths, delays = args.prompt_lengths, args.delays
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    graphs = use_cuda_graphs(args.cuda_graphs, device)
    placement = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), cuda_graphs=args.cuda_graphs)
    model = resolve_model(args.model, args.models_dir)  # built or downloaded once, before the server starts
    server_flags = ["--device", placement["device"], "--dtype", placement["dtype"], "--cuda-graphs", args.cuda_graphs]
    servers = [start_server(args.model, args.models_dir, args.threads, server_flags)]
    if args.against:
        tree = tree_at(args.against)
        models_dir = str(Path(args.models_dir).resolve())
        servers.append(start_server(args.model, models_dir, args.threads, server_flags, root=tree))
    target = servers[0][1]
    try:

        def split(**kw) -> SplitEngine:
            kw.setdefault("server", target)
            return SplitEngine(
                ClientConfig(
                    model=args.model, models_dir=args.models_dir, split=args.split, reconnect_s=0, **placement, **kw
                )
            )

        full = FullEngine(model, device, dtype, cuda_graphs=graphs)
        configs = [Config("full", full, split=False)]
        if args.profile:
            configs += [Config("split, trunk in-process", split(local_trunk=True)), Config("split over gRPC", split())]
        else:
            configs += [
                Config("split session fp32", split()),
                Config("split session fp16 wire", split(wire_dtype="float16")),
                Config("split stateless fp32", split(stateless=True)),
            ]
            if args.against:  # each beside its own: the server at REV, then this tree's
                before, rev = servers[1][1], args.against
                configs[1:1] = [Config(f"split session fp32, server at {rev}", split(server=before))]
                fp16 = Config(f"split session fp16 wire, server at {rev}", split(server=before, wire_dtype="float16"))
                configs[3:3] = [fp16]
            configs += [Config(f"split session +{d:g} ms each way", split(added_delay_ms=d)) for d in delays]
            for src in [x for x in args.speculate.split(",") if x.strip()]:
                for d in [0.0, *delays]:
                    plain = f"split session +{d:g} ms each way" if d else "split session fp32"
                    name = f"{plain}, speculate {src}"
                    configs.append(Config(name, split(added_delay_ms=d), speculate=src, plain=plain))
        if args.only:
            keep = {x.strip() for x in args.only.split(",")}
            configs = [c for c in configs if c.name == "full" or any(k in c.name for k in keep)]
        for c in configs:  # warm up every path once, at a length no row uses: the rows' lengths stay first-seen
            c.engine.run(prompt_ids(c.engine, 3), 4, GREEDY, c.speculate)

        started = time.time()
        if args.profile:
            output = {"profile": profile(configs, lengths, args.new_tokens, args.repeats)}
        else:
            output = compare(configs, lengths, args.new_tokens, args.repeats, args.temperature)
            output["checks"] = checks(model, full, device, dtype, graphs, lengths, args.new_tokens)
        elapsed = time.time() - started
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=30)

    m = machine(device)
    where = f"{m['gpu']}, CUDA {m['cuda']}" if device.type == "cuda" else f"{m['processor']}, {m['cpus']} CPUs"
    mode = f"temperature {args.temperature:g}, top-k 50" if args.temperature > 0 else "greedy"
    print(
        f"\nmodel {args.model}, split {args.split}, {args.new_tokens} new tokens x {args.repeats} repeats, "
        f"{mode}; {placement['device']} {placement['dtype']}, CUDA graphs {'on' if graphs else 'off'}; {where}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured in {elapsed:.0f} s\n"
    )
    if args.profile:
        print(profile_table(output["profile"]))
    else:
        print(table(output["results"]))
        for n, c in output["checks"].items():
            print(f"  prompt {n}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        print("\nfloat16 wire vs float32 wire, same greedy path:")
        for n, a in output["fp16_wire"].items():
            print(
                f"  prompt {n}: max |logit diff| {a['max_abs_logit_diff']:.3g}, greedy agreement "
                f"{a['greedy_agreement']}/{a['steps']}"
            )
        spec = speculation_table(output["results"], configs)
        if spec:
            kind = "sampling; the same distribution" if args.temperature > 0 else "greedy; the same tokens"
            print(f"\nspeculative decoding ({kind}), against the plain split at the same delay:\n")
            print(spec)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": args.model,
            "split": args.split,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "machine": machine(device),
            "placement": placement,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
        }
        args.json.write_text(json.dumps(meta | output, indent=2))
        print(f"\nwrote {args.json}")
    if args.plot and not args.profile:
        plot(output["results"], args.plot)
        print(f"wrote {args.plot}")


def machine(device: torch.device) -> dict:
    m = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        m |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return m


def checks(model, full: FullEngine, device, dtype, graphs: bool, lengths: list[int], n: int) -> dict:
    """Greedy tokens with CUDA graphs against without, and at this dtype against float32 (full model)."""
    out: dict[int, dict] = {n_: {} for n_ in lengths}
    others = {}
    if graphs:
        others["graphs on vs off: identical tokens"] = FullEngine(model, device, dtype, cuda_graphs=False)
    if dtype != torch.float32:
        label = f"{str(dtype).removeprefix('torch.')} vs float32: same greedy tokens until the first difference"
        others[label] = FullEngine(model, device, torch.float32, cuda_graphs=graphs)
    for length in lengths:
        ids = prompt_ids(full, length)
        want = full.run(ids, n, GREEDY).token_ids
        for label, engine in others.items():
            got = engine.run(ids, n, GREEDY).token_ids
            same = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), len(want))
            out[length][label] = got == want if "identical" in label else f"{same}/{len(want)} tokens"
    return out


def compare(configs: list[Config], lengths: list[int], new_tokens: int, repeats: int, temperature: float = 0.0) -> dict:
    """The comparison table's rows and the float16-wire agreement; runs sample at `temperature` (0: greedy)."""
    results = {(c.name, n): Result(c.name, n) for c in configs for n in lengths}
    for n in lengths:
        for i in range(repeats):
            # unseeded: a seeded speculative run keeps its draft length fixed (for the same tokens every time)
            params = SamplingParams(temperature, 50) if temperature > 0 else GREEDY
            # interleaved, so drift on a shared machine hits every config alike, and in the reverse order every
            # other repeat: a config's place in the round costs or gains it 1-2 ms a token here (the same client
            # code timed 26.3 and 27.6 ms a step, by place)
            for c in configs if i % 2 == 0 else configs[::-1]:
                run = c.engine.run(prompt_ids(c.engine, n), new_tokens, params, c.speculate)
                results[(c.name, n)].runs.append(run.stats)
    by_name = {c.name: c.engine for c in configs}
    ref, half = by_name.get("split session fp32"), by_name.get("split session fp16 wire")
    agreement = {}
    for n in lengths if ref and half else []:
        worst, agree, steps = wire_agreement(ref, half, prompt_ids(ref, n), new_tokens)
        agreement[n] = {"max_abs_logit_diff": worst, "greedy_agreement": agree, "steps": steps}
    return {"results": [results[(c.name, n)].summary() for n in lengths for c in configs], "fp16_wire": agreement}


if __name__ == "__main__":
    main()
