"""The README's commands, as written there: each command of its code blocks runs in a test (the CLI examples against
a real trunk server, the OpenAI snippet against the API, the run scripts in test_run_scripts.py), and every
subcommand that the README or the docs name answers --help. A README edit that adds a command fails
test_every_readme_command_runs_somewhere until a test runs it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import CORPUS, ROOT, TINY, subprocess_env

README = ROOT / "README.md"

# The README's shell commands that this file does not run itself, and where they run.
RUN_ELSEWHERE = {
    "bash scripts/run_all.sh": "tests/test_run_scripts.py::test_run_all",
    "bash scripts/run_server.sh": "tests/test_run_scripts.py::test_run_server",
    "bash scripts/test.sh": ".ci/run (CI runs exactly this command)",
    "export GPT2_TRUNK_SERVER=gpu-host:50051": "test_cli_examples sets GPT2_TRUNK_SERVER to its trunk server",
}


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks, without its comment."""
    lines = [line.split("  #")[0].strip() for block in readme_blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line]


def readme_openai_snippet(port: int) -> str:
    """Run the README's OpenAI snippet, as written, against the API on `port` (the README's is 8000); its stdout."""
    (snippet,) = [b for b in readme_blocks("python") if "OpenAI(" in b]
    assert "127.0.0.1:8000" in snippet
    out = subprocess.run(
        [sys.executable, "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_every_readme_command_runs_somewhere():
    commands = readme_commands()
    assert "bash scripts/run_all.sh" in commands and "bash scripts/test.sh" in commands
    unrun = [c for c in commands if not c.startswith("python -m ") and c not in RUN_ELSEWHERE]
    assert not unrun, f"README commands that no test runs: {unrun} (run them in a test, or say where in RUN_ELSEWHERE)"
    assert [c for c in commands if c.startswith("python -m ")], "the README shows no CLI example"


# What a test changes in a README command, flag by flag: the small model, few steps and tokens, its own folders.
def _as_test(argv: list[str], tmp_path) -> list[str]:
    data = tmp_path / "my_texts"
    data.mkdir(exist_ok=True)
    (data / "corpus.txt").write_text(CORPUS.read_text())
    changes = {
        "--model": TINY,
        "--steps": "2",
        "--max-tokens": "8",
        "--data": str(data),
        "--out": str(tmp_path / "out"),
    }
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in changes:
            out[i + 1] = changes[arg]
    return out


@pytest.mark.process
@pytest.mark.slow
def test_cli_examples(tmp_path, server_target, tiny):
    """The README's `python -m ...` lines, each run as written (the small model, 8 tokens, 2 steps) against a
    real trunk server: every one exits 0; the split client's greedy --json tokens equal the baseline's, with the
    trunk on the server and in this process alike; train writes a PEFT adapter."""
    env = subprocess_env(GPT2_TRUNK_SERVER=server_target, GPT2_MODEL=TINY)
    results = {}
    for command in [c for c in readme_commands() if c.startswith("python -m ")]:
        argv = _as_test(shlex.split(command), tmp_path)
        out = subprocess.run(
            [sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
        )
        assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
        results[command] = out.stdout
    generated = {c: json.loads(o)["token_ids"] for c, o in results.items() if "--json" in c}
    split = [ids for c, ids in generated.items() if c.startswith("python -m client")]
    full = [ids for c, ids in generated.items() if c.startswith("python -m baseline")]
    assert split and full and all(ids == full[0] for ids in split), generated
    local = [o for c, o in results.items() if "--local-trunk" in c]
    assert local and all(o.strip() for o in local)
    assert [c for c in results if " train " in c], "the README shows no training command"
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def _named_subcommands() -> list[tuple[str, ...]]:
    pages = [README, *(ROOT / "docs").rglob("*.md")]
    found = set()
    for page in pages:
        for module, sub in re.findall(
            r"python -m (server|client|baseline)\b(?: ([a-z][a-z-]*[a-z]))?", page.read_text()
        ):
            found.add((module, sub) if sub and not sub.startswith("-") else (module,))
    return sorted(found)


@pytest.mark.process
@pytest.mark.slow
def test_every_named_subcommand_answers_help_before_anything_heavy_loads():
    """`python -m MODULE [SUBCOMMAND] --help` exits 0 for each that the README or the docs name, and a bad flag is
    refused (exit 2, one line), both having imported none of torch, transformers, gRPC or Gradio (Python's own
    import log says what loaded) and well inside a generous bound of wall time (under 1 s on an idle machine)."""
    named = _named_subcommands()
    assert ("server",) in named and ("client", "generate") in named
    heavy = {"torch", "transformers", "grpc", "gradio", "fastapi"}

    def run(cmd: tuple[str, ...], flag: str):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", *cmd, flag], capture_output=True, text=True, cwd=ROOT,
            env=subprocess_env(), timeout=120,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
        return cmd, flag, out, sorted(loaded & heavy), wall

    jobs = [(c, f) for c in named for f in ("--help", "--no-such-flag")]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    helped = [(c, o) for c, f, o, _, _ in results if f == "--help"]
    failed = [(c, o.stderr[-500:]) for c, o in helped if o.returncode or "usage" not in o.stdout]
    assert not failed, failed
    said = {
        c: [x for x in o.stderr.splitlines() if not x.startswith("import time:")]
        for c, f, o, _, _ in results
        if f != "--help"
    }
    refused = [(c, o.returncode) for c, f, o, _, _ in results if f != "--help"]  # argparse's usage, then one line
    assert all(code == 2 and ": error: " in said[c][-1] for c, code in refused), said
    heavy_loaded = [(c, f, loaded) for c, f, _, loaded, _ in results if loaded]
    assert not heavy_loaded, heavy_loaded
    slow = [(c, f, round(w, 2)) for c, f, _, _, w in results if w > 5.0]  # two at a time, importtime on: generous
    assert not slow, slow


def _fake_root(tmp_path):
    """A copy of ensure_env.sh and the requirements beside a venv whose python only logs how it is called."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("requirements.txt", "requirements-dev.txt", "scripts/ensure_env.sh"):
        (root / name).write_text((ROOT / name).read_text())
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    (bin_dir / "python").chmod(0o755)
    return root


def _source(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'source "{root}/scripts/ensure_env.sh" {" ".join(args)}; set -o | grep errexit'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_ensure_env_after_dev_installs_nothing(tmp_path):
    """After `ensure_env.sh dev`, the runtime set is there: `ensure_env.sh` installs nothing; a changed requirement
    installs again; sourcing leaves no `set -e` behind in the caller's shell."""
    root = _fake_root(tmp_path)
    calls = tmp_path / "calls"
    first = _source(root, "dev")
    assert first.returncode == 0, first.stderr
    assert "pip install" in calls.read_text() and (root / ".venv" / ".installed-dev").is_file()
    calls.unlink()
    for args in (("dev",), ()):
        again = _source(root, *args)
        assert again.returncode == 0 and not calls.exists(), (args, again.stderr)
        assert "off" in again.stdout  # errexit stays as the caller had it
    (root / "requirements.txt").write_text((root / "requirements.txt").read_text() + "\n# changed\n")
    assert _source(root).returncode == 0
    assert "pip install" in calls.read_text()
