"""What the trunk can read, and what each defence costs: one row per cut and defence, on private text the
attacker never saw. Prints a markdown table and writes JSON (after each row, so a cut-short run keeps its rows).

    python scripts/bench_privacy.py                          # trained:kjv: public = Old Testament, private = New
    python scripts/bench_privacy.py --rows quick --steps 200 # fewer rows, a weaker (cheaper) attacker
    python scripts/bench_privacy.py --noise-aware 10      # a learned denoiser and a noise-aware trunk LoRA at noise 10
    python scripts/bench_privacy.py --obfuscate 0.1       # learned obfuscation at privacy weight 0.1, two attackers

The attacker (client/privacy.py) trains on the public text sent through the client's own bottom and defence,
with its own noise draws, and is retrained for every row; the client draws its noise from another seed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every entry point: before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.privacy import InverterConfig, public_text  # noqa: E402
from client.privacy_eval import Setting, attack_floor, evaluate, load_texts, table  # noqa: E402
from splitcore.models import load_tokenizer, resolve_model  # noqa: E402

ROWS = {
    "default": [
        *(Setting(f"{c},10") for c in (1, 2, 4, 6)),
        *(Setting("2,10", "gaussian", s) for s in (0.3, 1.0, 3.0, 10.0)),
        *(Setting("2,10", "gaussian", s, denoise="subtract") for s in (1.0, 3.0, 10.0, 30.0)),
        Setting("2,10", "laplace", 10.0, denoise="subtract"),
    ],
    "quick": [Setting("2,10"), Setting("2,10", "gaussian", 3.0), Setting("2,10", "gaussian", 3.0, denoise="subtract")],
}
ROWS["noise"] = [s for s in ROWS["default"] if s.split == "2,10"]  # the rows the client's noise decides
# one row per distinct wire: subtraction changes what the client does with the answer, not what it sends
_SENT = {(s.split, s.defence, s.noise_scale) for s in ROWS["default"] if s.denoise == "none"}
ROWS["distinct"] = [
    s for s in ROWS["default"] if s.denoise == "none" or (s.split, s.defence, s.noise_scale) not in _SENT
]
GRAD_CLIP = 1e-5  # about the median gradient RMS of a position in these runs (8 windows of 64: 1.3e-5)
GRADIENT_ROWS = {  # --client-train, --grad-noise, the states' --noise-scale (gaussian), --grad-clip
    "labels": [
        ("none", 0.0, 0.0, 0.0),
        ("lora", 0.0, 0.0, 0.0),
        ("full", 0.0, 0.0, 0.0),
        ("none", 1.0, 0.0, 0.0),
        ("none", 3.0, 0.0, 0.0),
        ("none", 10.0, 0.0, 0.0),
    ],
    "together": [("none", 0.0, 0.0, 0.0), ("none", 0.0, 10.0, 0.0), ("none", 10.0, 10.0, 0.0)],  # the states too
    "together-defended": [("none", 10.0, 10.0, 0.0)],  # its defended row alone (x undefended: from "together")
    "clip": [  # DP-style: each position's gradient clipped, then noise of a fixed std, against relative noise
        ("none", 0.0, 0.0, 0.0),
        ("none", 3.0, 0.0, 0.0),
        ("none", 10.0, 0.0, 0.0),
        ("none", 0.0, 0.0, GRAD_CLIP),
        ("none", 3.0, 0.0, GRAD_CLIP),
        ("none", 10.0, 0.0, GRAD_CLIP),
    ],
}  # fmt: skip


def gradient_rows(args, texts) -> list[dict]:
    """Split training on the private text's second half over a trunk server on loopback, one run per row of
    GRADIENT_ROWS[--gradients], the gradient attack reading the first and the last step (and, for "together",
    the exact attacker reading the last step's states)."""
    from client.privacy_eval import format_gradient_row, gradient_row
    from scripts.bench import start_server

    text = public_text(args.private)
    train_text = text[len(text) // 2 :]  # the scored windows and prompts come from the first half
    proc, target = start_server(args.model, args.models_dir, None, ["--device", "cpu"])
    rows: list[dict] = []
    try:
        together = args.gradients.startswith("together")
        for client_train, grad_noise, state_noise, grad_clip in GRADIENT_ROWS[args.gradients]:
            read_at = (args.train_steps,) if together else (1, args.train_steps)
            row = gradient_row(args.model, args.models_dir, target, client_train, grad_noise, train_text,
                               texts.private, args.train_steps, read_at, say, state_noise,
                               texts.public if together else None, grad_clip)  # fmt: skip
            rows.append(row)
            say(format_gradient_row(row, rows[0]["perplexity"]))
            yield row
    finally:
        proc.terminate()
        proc.wait(30)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def every_50(what: str, say):
    def progress(step: int, steps: int, loss: float) -> None:
        if step % 50 == 0 or step == steps:
            say(f"{what}: step {step}/{steps}, loss {loss:.4f}")

    return progress


def trained_rows(args, say) -> list[Setting]:
    """Rows whose client trains over a trunk server on loopback first, on the public text (the attacker's
    own run of a recipe on the other half of it). --obfuscate W: learned obfuscation, with an attacker that has
    the client's weights and one that has the recipe alone. --noise-aware S: the trunk's LoRA trained through
    gaussian noise S with denoising by subtraction, and the same LoRA recipe without noise as its control."""
    from client.denoise import train_denoiser
    from client.privacy_eval import engine_for, train_split
    from scripts.bench import start_server

    text = public_text(args.public)
    halves = text[: len(text) // 2], text[len(text) // 2 :]
    out = Path(args.json).parent / "trained"
    steps = args.train_steps
    proc, target = start_server(args.model, args.models_dir, None, ["--device", "cpu"])
    try:
        if args.obfuscate is not None:
            w, cut = args.obfuscate, Setting("2,10")
            pairs = str(out / f"obfuscate-w{w:g}-trunk-pairs.pt") if args.collect_steps else None
            mine = train_split(args.model, args.models_dir, target, cut, halves[0], str(out / f"obfuscate-w{w:g}"),
                               steps, 1, "full", w, say, pairs, args.collect_steps)  # fmt: skip
            theirs = train_split(args.model, args.models_dir, target, cut, halves[1],
                                 str(out / f"obfuscate-w{w:g}-attacker"), steps, 2, "full", w, say)  # fmt: skip
            name = f"learned obfuscation, weight {w:g}"
            if pairs is not None:  # this row alone (the other two come from a run without --collect-steps)
                who = f"attacker knows the recipe and reads the last {args.collect_steps} training steps"
                return [Setting("2,10", adapter=mine, attacker_adapter=theirs, attacker_pairs=pairs,
                                name=f"{name} ({who})")]  # fmt: skip
            return [
                Setting("2,10", adapter=mine, name=f"{name} (attacker has the client's weights)"),
                Setting("2,10", adapter=mine, attacker_adapter=theirs, name=f"{name} (attacker knows the recipe)"),
            ]
        sigma = args.noise_aware
        noisy = Setting("2,10", "gaussian", sigma, denoise="subtract")
        denoiser = str(out / f"denoiser-{sigma:g}")
        with engine_for(args.model, args.models_dir, noisy) as engine:  # the trunk in-process: the same answers
            ids = torch.tensor(engine.encode(halves[0]), dtype=torch.long)
            train_denoiser(engine, ids, min(steps, 200), progress=every_50("denoiser", say)).save(denoiser)
        lora = train_split(args.model, args.models_dir, target, noisy, halves[0], str(out / f"noise-aware-{sigma:g}"),
                           steps, 1, "none", 0.0, say)  # fmt: skip
        control = train_split(args.model, args.models_dir, target, Setting("2,10"), halves[0],
                              str(out / "lora-control"), steps, 1, "none", 0.0, say)  # fmt: skip
        return [
            replace(noisy, denoise=denoiser),
            Setting("2,10", adapter=control, name="none + the same LoRA recipe without noise (control)"),
            replace(noisy, adapter=lora, name=f"gaussian {sigma:g} + denoise subtract + noise-aware trunk LoRA"),
        ]
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="trained:kjv")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--public", default="bible:Gen1:1-Mal4:6", help="the attacker's text (default: Old Testament)")
    p.add_argument("--private", default="bible:Matt1:1-Rev22:21", help="the client's (default: New Testament)")
    p.add_argument("--rows", choices=sorted(ROWS), default="default")
    p.add_argument("--windows", type=int, default=32, help="private windows of 64 tokens scored (and perplexity)")
    p.add_argument("--prompts", type=int, default=20, help="prompts for greedy agreement and decode time")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--steps", type=int, default=InverterConfig.steps, help="the inverter's training steps")
    p.add_argument("--exact-windows", type=int, default=16, help="private windows the exact attacker reads (slow)")
    p.add_argument("--beam", type=int, default=1, help="the exact attacker's beam")
    p.add_argument(
        "--obfuscate",
        type=float,
        default=None,
        metavar="W",
        help="instead of the rows: learned obfuscation at privacy weight W (a trunk server on loopback; the "
        "client trains on one half of the public text, the attacker's own run of the recipe on the other)",
    )
    p.add_argument(
        "--noise-aware",
        type=float,
        default=None,
        metavar="S",
        help="instead of the rows: the trunk's LoRA trained through gaussian noise S (with denoising), and a control",
    )
    p.add_argument(
        "--gradients",
        choices=sorted(GRADIENT_ROWS),
        default=None,
        help="instead of the rows: split training on the private text, with the gradient attack reading its labels "
        "from what the trunk holds (labels: for each --client-train and --grad-noise; together: under noise on the "
        "states too, with the exact attacker reading the states sent; clip: --grad-clip with and without "
        "--grad-noise, beside noise relative to each position's gradient)",
    )
    p.add_argument("--train-steps", type=int, default=300, help="split training steps for those rows")
    p.add_argument(
        "--collect-steps",
        type=int,
        default=0,
        help="with --obfuscate: instead of its two rows, the row of an attacker that knows the recipe and also "
        "collects (state sent, token read from the gradient) over the last K steps of the client's training",
    )
    p.add_argument("--json", default="bench_results/privacy.json")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json and run the others")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model = resolve_model(args.model, args.models_dir)
    tok = load_tokenizer(model.path)
    texts = load_texts(tok.encode, args.public, args.private, args.windows, args.prompts)
    inverter = InverterConfig(steps=args.steps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "commit": commit.stdout.strip(),
        "command": " ".join(sys.argv),
        "model": args.model,
        "public": f"{args.public}: {len(texts.public)} tokens",
        "private": f"{args.private}: {texts.private.numel()} tokens scored, {len(texts.prompts)} prompts of 16",
        "inverter": asdict(inverter),
        "complete": False,
        "rows": [],
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.gradients:
        from client.privacy_eval import GRADIENT_HEADER, format_gradient_row

        for row in gradient_rows(args, texts):
            out["rows"].append(row)
            path.write_text(json.dumps(out, indent=1))
        out["complete"] = True
        path.write_text(json.dumps(out, indent=1))
        ppl = out["rows"][0]["perplexity"]
        print("\n".join([GRADIENT_HEADER, *(format_gradient_row(r, ppl) for r in out["rows"])]))
        print(f"\nJSON: {path}")
        return
    clean: dict = {}
    done = {}
    if args.resume and path.is_file():  # a cut-short run of the same table: its rows stand
        done = {r["setting"]: r for r in json.loads(path.read_text())["rows"]}
    out.update(attack_floor(args.model, args.models_dir, texts, clean))
    say(f"the floor (nothing observed): {out['floor']:.1%}, {out['floor_reader']}")
    trained = args.obfuscate is not None or args.noise_aware is not None
    settings = trained_rows(args, say) if trained else ROWS[args.rows]
    for s in settings:
        if s.label in done:
            out["rows"].append(done[s.label])
            say(f"{s.label}: kept from {path}")
            continue
        row = evaluate(args.model, args.models_dir, s, texts, inverter, args.tokens, clean, say, args.exact_windows,
                       args.beam)  # fmt: skip
        out["rows"].append(row)
        path.write_text(json.dumps(out, indent=1))
    out["complete"] = True
    path.write_text(json.dumps(out, indent=1))
    print(table(out["rows"], out))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
