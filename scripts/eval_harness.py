"""EleutherAI's lm-evaluation-harness against the split model's API and the full model's, side by side.

A trunk server, `python -m client api` over it and `python -m baseline api` start on this machine; the harness's
`local-completions` model, with its defaults (token-id requests), runs three local tasks against each: generation
until a newline, a two-choice question (the true last word of a sentence against another's) and perplexity
(`loglikelihood_rolling`). The tasks are made from text the model never trained on (trained:kjv: the New
Testament), written as JSON lines and task YAML the harness reads offline. Prints a table (scores, split against
full, and each run's wall time) and writes JSON.

    python scripts/eval_harness.py --model trained:kjv --docs 100 --json bench_results/lm_eval.json

The same, by hand, for any task the harness knows (`--include_path` names the directory of the YAML files):

    python -m client api --port 8000 &
    lm_eval --model local-completions --tasks split_choice --include_path DIR \\
        --model_args model=trained:kjv,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=models/trained-kjv
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ["split_gen", "split_choice", "split_ppl"]
METRICS = {
    "split_gen": ["exact_match"],
    "split_choice": ["acc"],
    "split_ppl": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
}


def docs_from_text(text: str, n: int, seed: int = 0) -> list[dict]:
    """Up to `n` sentences of 8 to 40 words: each a context (all but its last word), two choices (its last word and
    another sentence's, in a seeded order) and the label of the true one."""
    sentences = [s.strip() for s in re.split(r"(?<=[.;:?!])\s+", text) if 8 <= len(s.split()) <= 40]
    rng = random.Random(seed)
    picked = sentences[:n]
    out = []
    for s in picked:
        words = s.rstrip(".;:?!").split()
        other = rng.choice([x for x in picked if x != s] or [s]).rstrip(".;:?!").split()[-1]
        choices = [" " + words[-1], " " + other]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        out.append({"context": " ".join(words[:-1]), "choices": choices, "label": label, "text": s})
    return out


def write_tasks(d: Path, docs: list[dict]) -> None:
    """The three tasks (TASKS) over `docs`, as JSON lines and task YAML in `d` (the harness's --include_path)."""
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\ntest_split: test\n"
    (d / "split_gen.yaml").write_text(
        "task: split_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
        "  temperature: 0\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (d / "split_choice.yaml").write_text(
        "task: split_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (d / "split_ppl.yaml").write_text(
        "task: split_ppl\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )


def start_api(args: list[str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m ARGS --port PORT` (client api or baseline api) until it answers; (process, completions URL)."""
    import httpx

    cmd = [sys.executable, "-m", *args, "--port", str(port), "--log-file", str(log)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    line = p.stdout.readline()
    if "OpenAI-compatible API on" not in line:
        p.kill()
        raise RuntimeError(f"the API did not start: {line!r} {p.stdout.read()[-2000:]}")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"the API on port {port} did not answer")
        time.sleep(0.1)
    return p, f"http://127.0.0.1:{port}/v1/completions"


def evaluate(url: str, model: str, tasks_dir: Path, tokenizer: str, concurrent: int = 2) -> dict:
    """One harness run of TASKS against `url`, as a user runs it (its defaults: tokenized requests)."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"model": model, "base_url": url, "tokenizer": tokenizer, "max_retries": 1, "num_concurrent": concurrent}
    return simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def metric(results: dict, task: str, name: str) -> float:
    return float(results["results"][task][f"{name},none"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="trained:kjv")
    p.add_argument("--models-dir", default=os.environ.get("GPT2_MODELS_DIR", "models"))
    p.add_argument("--text", default="bible:Matt1:1-Rev22:21", help="where the task's sentences come from")
    p.add_argument("--docs", type=int, default=100, help="sentences in each task")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from client.privacy import public_text
    from scripts.bench import start_server
    from scripts.bench_transport import free_port
    from splitcore.models import resolve_model

    model = resolve_model(args.model, args.models_dir)
    docs = docs_from_text(public_text(args.text), args.docs)
    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-"))
    write_tasks(tmp, docs)
    common = ["--model", args.model, "--models-dir", args.models_dir, "--device", "cpu"]
    trunk, target = start_server(args.model, args.models_dir, None, ["--device", "cpu"])
    procs, runs, walls = [trunk], {}, {}
    try:
        for name, entry in (("split", ["client", "api", "--server", target]), ("full", ["baseline", "api"])):
            proc, url = start_api([*entry, *common], free_port(), ROOT / "logs" / f"lm_eval_{name}.log")
            procs.append(proc)
            t0 = time.perf_counter()
            runs[name] = evaluate(url, args.model, tmp, str(model.path))
            walls[name] = time.perf_counter() - t0
            print(f"  {name}: {walls[name]:.1f} s", file=sys.stderr)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    rows = []
    for task in TASKS:
        for m in METRICS[task]:
            a, b = metric(runs["split"], task, m), metric(runs["full"], task, m)
            rows.append({"task": task, "metric": m, "split": a, "full": b, "rel_diff": abs(a - b) / max(abs(b), 1e-12)})
    print(
        f"\nlm-eval {__import__('lm_eval').__version__}, local-completions, {args.model}, {len(docs)} sentences of "
        f"{args.text}\n"
    )
    print("| task | metric | split | full | relative difference |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['metric']} | {r['split']:.6g} | {r['full']:.6g} | {r['rel_diff']:.1e} |")
    print(
        f"\nwall time of the harness run: split {walls['split']:.1f} s, full {walls['full']:.1f} s "
        f"({walls['split'] / walls['full']:.2f}x)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"model": args.model, "text": args.text, "docs": len(docs), "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps(out | {"rows": rows, "wall_s": walls}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
