"""Federated split learning, measured: is it worth it? Three data owners hold disjoint books of the New Testament,
which trained:kjv never saw (the Gospels; Acts with the Epistles; Revelation), each with its last 10% held out.
The same recipe trains four ways, and every model is scored on every owner's held-out text and on their union:

- the base model, untrained;
- each owner alone, for as many steps as it trains in the federation;
- the federation: `python -m client federate serve` and three `federate join` processes (Flower's SuperLink and
  SuperNodes) against a trunk server, all on loopback; FedAvg weighted by training windows;
- the pooled data, as if one owner held all three (what federation tries to reach), for the federation's total
  steps.

The baselines train in this process (LocalTrainer: the whole model, the split's exact reference, tests/
test_training.py); the federation trains over the split and Flower, as a user runs it. Prints a markdown table,
writes JSON and a plotly chart of held-out perplexity by round.

    python scripts/bench_federated.py                        # 4 rounds of 25 steps, B x T = 8x128
    python scripts/bench_federated.py --rounds 2 --local-steps 5 --model random:tiny   # a quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.config import FederationConfig  # noqa: E402
from client.federated import held_out_loss, load_weights  # noqa: E402
from client.split_training import LocalTrainer  # noqa: E402
from scripts.bench import start_server  # noqa: E402
from scripts.bench_transport import free_port  # noqa: E402
from splitcore.models import load_tokenizer, resolve_model  # noqa: E402
from splitcore.presets import kjv_text  # noqa: E402
from splitcore.training import TextData  # noqa: E402

OWNERS = {  # disjoint parts of the New Testament
    "gospels": "Matt1:1-John21:25",
    "acts+epistles": "Acts1:1-Jude1:25",
    "revelation": "Rev1:1-Rev22:21",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def owner_texts(work: Path) -> dict[str, Path]:
    out = {}
    for name, passages in OWNERS.items():
        d = work / "owners" / name
        d.mkdir(parents=True)
        (d / f"{name}.txt").write_text(kjv_text(passages), encoding="utf-8")
        out[name] = d
    return out


class Scorer:
    """Held-out loss of a set of weights on each owner's held-out windows, and on their union (by windows)."""

    def __init__(self, model, fed: FederationConfig, datas: dict[str, TextData]):
        self.model, self.fed, self.datas = model, fed, datas
        self.layers = list(range(model.config.n_layer))

    def trainer(self, weights=None) -> LocalTrainer:
        return LocalTrainer(self.model, self.layers, self.fed.lora(), (weights, {}, 0) if weights else None)

    def score(self, weights=None) -> dict[str, float]:
        t, total, n_all, out = self.trainer(weights), 0.0, 0, {}
        for name, data in self.datas.items():
            loss, n = held_out_loss(t, data, self.fed)
            out[name], total, n_all = math.exp(loss), total + loss * n, n_all + n
        out["union"] = math.exp(total / n_all)
        return out

    def train(self, data: TextData, steps: int) -> dict:
        t = self.trainer()
        for step in range(1, steps + 1):
            t.step(step, data.batch(step, self.fed.batch_size, self.fed.seed))
        return t.adapter()


def pooled(datas: dict[str, TextData]) -> TextData:
    first = next(iter(datas.values()))
    train = torch.cat([d.train for d in datas.values()])
    held = torch.cat([d.held_out for d in datas.values()])
    return TextData(train, held, first.block, [s for d in datas.values() for s in d.sources])


def gradient_reads(args, fed: FederationConfig, target: str, weights, data: TextData, first: int, steps: int) -> dict:
    """What the trunk's operator reads of an owner's training labels from the gradients it is sent, through the
    public top (client/gradient_attack.py), over `steps` steps of the owner's training from `weights` (None: the
    public model, an owner's first round)."""
    from client.config import ClientConfig
    from client.gradient_attack import GradientLabels, StepTap
    from client.split_engine import SplitEngine
    from client.split_training import SplitTrainer

    engine = SplitEngine(ClientConfig(model=fed.model, models_dir=args.models_dir, server=target, device="cpu"))
    attack = GradientLabels(engine.parts["top"])  # the public top: the owners' adapters are not the trunk's to see
    trainer = SplitTrainer(engine, fed.lora(), fed.client_train, (weights, {}, 0) if weights else None)
    trainer.remote = tap = StepTap(trainer.remote)
    hits = total = 0
    try:
        for step in range(first, first + steps):
            ids = data.batch(step, fed.batch_size, fed.seed)
            trainer.step(step, ids)
            out, grad = tap.steps.pop()
            hits += int((attack.read(out, grad) == ids[:, 1:]).sum())
            total += ids[:, 1:].numel()
    finally:
        trainer.close()
        engine.close()
    return {"labels_read": hits, "labels": total, "share": hits / total}


def federate(args, fed: FederationConfig, owners: dict[str, Path], work: Path, target: str) -> dict:
    """The federation as a user runs it: `federate serve`, and one `federate join` per owner, against the trunk
    server at `target`."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPT2_MODELS_DIR=args.models_dir)
    flags = [x for k, v in asdict(fed).items() for x in (f"--{k.replace('_', '-')}", str(v))]
    procs = []
    t0 = time.perf_counter()
    try:
        serve = subprocess.Popen(
            [sys.executable, "-m", "client", "federate", "serve", *flags, "--port", str(port)],
            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(serve)
        for name, d in owners.items():
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "client",
                        "federate",
                        "join",
                        "--data",
                        str(d),
                        "--name",
                        name,
                        "--federation",
                        f"127.0.0.1:{port}",
                        "--server",
                        target,
                        "--device",
                        "cpu",
                        "--workdir",
                        str(work / "nodes" / name),
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
        for line in serve.stderr:
            say("  " + line.rstrip())
        if serve.wait() != 0:
            raise SystemExit(f"the federated run failed: see {fed.out}/federate.log")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(30)
    log = json.loads((Path(fed.out) / "federation_log.json").read_text())["rounds"]
    return {"seconds": time.perf_counter() - t0, "rounds": log, "weights": load_weights(Path(fed.out))}


def plot(rows: list[dict], rounds: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    x = [r["round"] for r in rounds]
    fig.add_scatter(
        x=x,
        y=[math.exp(r["averaged_held_out_loss"]) for r in rounds],
        name="federated (averaged model)",
        mode="lines+markers",
    )
    for row in rows:
        if row["model"] != "federated":
            fig.add_hline(y=row["union"], line_dash="dot", annotation_text=row["model"])
    fig.update_layout(
        title="Held-out perplexity on the three owners' union, by federated round",
        xaxis_title="round",
        yaxis_title="perplexity",
    )
    fig.write_html(str(path), include_plotlyjs="cdn")


def table(rows: list[dict]) -> str:
    names = [*OWNERS, "union"]
    lines = ["| model | steps | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def baselines(scorer: Scorer, datas: dict[str, TextData], steps: int) -> tuple[list[dict], dict[str, float]]:
    """The base model, each owner alone for `steps`, and the pooled data for the federation's total steps."""
    rows = [{"model": "base (untrained)", "steps": 0, **scorer.score()}]
    timings = {}
    runs = [(f"{name} alone", data, steps) for name, data in datas.items()]
    runs.append(("pooled", pooled(datas), steps * len(datas)))
    for name, data, n in runs:
        say(f"training {name} for {n} steps ...")
        t0 = time.perf_counter()
        rows.append({"model": name, "steps": n, **scorer.score(scorer.train(data, n))})
        timings[name] = time.perf_counter() - t0
    return rows, timings


def report(json_path: str, fed, datas, rows, res, reads, timings) -> None:
    """The tables on stdout; the record as JSON, and the chart beside it."""
    print(table(rows))
    print()
    last = reads.pop("owner")
    print(f"| {last}'s training, undefended | labels the trunk reads from the gradient |\n|---|---:|")
    for name, r in reads.items():
        print(f"| {name} | {r['labels_read']}/{r['labels']} ({r['share']:.1%}) |")
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": str(date.today()),
        "settings": asdict(fed) | {"out": None},
        "owners": {
            n: {"passages": OWNERS[n], "train_tokens": len(d.train), "held_out_tokens": len(d.held_out)}
            for n, d in datas.items()
        },  # fmt: skip
        "rows": rows,
        "rounds": res["rounds"],
        "gradient_attack": {"owner": last, "steps_read": 2, "reads": reads},
        "seconds": timings,
        "torch_threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(record, indent=1))
    plot(rows, res["rounds"], out.with_suffix(".html"))
    say(f"wrote {out} and {out.with_suffix('.html')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="trained:kjv")
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=25)
    p.add_argument("--json", default=str(ROOT / "bench_results" / f"federated-{date.today()}.json"))
    args = p.parse_args()
    fed = FederationConfig(
        model=args.model, rounds=args.rounds, local_steps=args.local_steps, min_owners=len(OWNERS),
        batch_size=8, block_size=128, lora_rank=16, lora_alpha=32, lr=2e-3, eval_batches=16, client_train="lora",
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    fed = replace(fed, out=str(work / "federation"))
    owners = owner_texts(work)
    model = resolve_model(fed.model, args.models_dir)
    encode = load_tokenizer(model.path).encode
    datas = {n: TextData.from_path(d, encode, fed.block_size) for n, d in owners.items()}
    for n, d in datas.items():
        say(f"{n}: {len(d.train):,} training tokens, {len(d.held_out):,} held out")
    scorer, steps = Scorer(model, fed, datas), fed.rounds * fed.local_steps
    rows, timings = baselines(scorer, datas, steps)
    say(f"federating: {len(owners)} owners, {fed.rounds} rounds of {fed.local_steps} steps, over the split ...")
    trunk, target = start_server(fed.model, args.models_dir, None, [])
    try:
        res = federate(args, fed, owners, work, target)
        timings["federated"] = res["seconds"]
        rows.append({"model": "federated", "steps": f"{steps} x {len(datas)}", **scorer.score(res["weights"])})
        say("the trunk reading an owner's labels from its gradients: its first round, and the round after the last")
        last = next(reversed(datas))
        reads = {
            "round 1 (from the public model)": gradient_reads(args, fed, target, None, datas[last], 1, 2),
            f"round {fed.rounds + 1} (from the averaged model)": gradient_reads(
                args, fed, target, res["weights"], datas[last], steps + 1, 2
            ),
        }
    finally:
        trunk.terminate()
        trunk.wait(30)
    report(args.json, fed, datas, rows, res, reads | {"owner": last}, timings)


if __name__ == "__main__":
    main()
