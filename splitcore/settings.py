"""Settings declared once: a dataclass field names its own flag, environment variable(s), help and choices
(`setting`), and `dataclass_flags` makes the argparse flags from them. The model settings every process shares
are `ModelConfig`; the server's, the client's and the training and distillation commands' build on it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from pathlib import Path
from typing import Any

from splitcore.errors import InvalidInput

# Names that settings choose among, here so that command lines parse without loading torch (their homes re-export)
DEFAULT_SPLIT = "2,10"  # s1,s2: the client keeps blocks [0, s1) and [s2, n_layer); the trunk [s1, s2)
NOISE_KINDS = ("gaussian", "laplace")  # splitcore.defence.Noise
DENOISERS = ("none", "subtract")  # or the directory of a trained splitcore.defence.Denoiser


def setting(
    default: Any,
    env: str | tuple[str, ...] | None = None,
    help: str = "",
    *,
    flag: str | tuple[str, ...] | None = None,
    choices: list[str] | None = None,
    hidden: bool = False,
) -> Any:
    """A field of a settings dataclass that declares its command-line flag once: `--field-name` (or `flag`), the
    environment variable(s) its default comes from (the first one set wins), its help and choices. See
    `dataclass_flags`. A `hidden` flag works but is left out of --help (settings for tests and benchmarks)."""
    meta = {"env": env, "help": help, "flag": flag, "choices": choices, "hidden": hidden}
    return dataclasses.field(default=default, metadata=meta)


_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}


def _env_file(p: argparse.ArgumentParser, name: str) -> str:
    """A setting's value from the file that NAME_FILE names (a mounted secret: a token, a login), less its final
    newline; a missing or unreadable file is one readable line."""
    path = os.environ[name]
    try:
        return Path(path).read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"{name}: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}")


def dataclass_flags(p: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    """One flag per field of a settings dataclass: `--batch-size`, typed from the field's annotation and defaulted
    from the field, or from its environment variable (a `setting`); its help the setting's, else the field's
    comment (`batch_size: int = 8  # windows per step`). Booleans are switches (an environment value of 1 turns
    them on); for an optional field an empty environment value means None. A bad environment value is one
    readable line."""
    try:
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
    except (OSError, TypeError):  # a class made at run time (make_dataclass) has no source: help from `setting`
        comments = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = _KINDS[
            (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).split("|")[0].strip()
        ]
        text = (meta.get("help") or comments.get(f.name, "")).replace("%", "%%")  # argparse %-formats help
        if meta.get("hidden"):
            text = argparse.SUPPRESS
        if f.name in positional:
            p.add_argument(f.name, help=text)
            continue
        flags = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        flags = (flags,) if isinstance(flags, str) else flags
        envs = meta.get("env") or ()
        envs = (envs,) if isinstance(envs, str) else envs
        default, raw, name = f.default, None, None
        for name in envs:
            raw = os.environ.get(name)
            if raw is None and os.environ.get(f"{name}_FILE"):
                name = f"{name}_FILE"
                raw = _env_file(p, name)
            if raw is not None:
                break
        if raw is not None:
            default = _from_env(p, name, raw, kind, f.default)
        if kind is bool:
            where = f" (env {' or '.join(envs)})" if envs else ""
            p.add_argument(*flags, dest=f.name, action="store_true", default=default, help=_help(text, where))
        elif kind is tuple:  # a flag given any number of times (the environment's value: comma-separated)
            where = f" (env {' or '.join(envs)}, comma-separated)" if envs else ""
            metavar = flags[-1].lstrip("-").upper().replace("-", "_")
            p.add_argument(
                *flags, dest=f.name, action=_Several, default=tuple(default), metavar=metavar, help=_help(text, where)
            )
        else:
            where = f"env {' or '.join(envs)}; " if envs else ""
            p.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=default,
                choices=meta.get("choices"),
                metavar=None if meta.get("choices") else flags[-1].lstrip("-").upper().replace("-", "_"),
                help=_help(text, f" ({where}default %(default)s)"),
            )


def _help(text: str, more: str) -> str:
    return text if text == argparse.SUPPRESS else text + more


class _Several(argparse.Action):
    """A flag given any number of times: each adds its value to the tuple (after the environment's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (*getattr(namespace, self.dest, ()), values))


def _from_env(p: argparse.ArgumentParser, name: str, raw: str, kind: type, default: Any) -> Any:
    if kind is bool:
        return raw == "1"
    if kind is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if raw == "" and default is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        p.error(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}")


@dataclasses.dataclass
class ProcessConfig:
    """The settings of every command: threads and logging."""

    threads: int | None = setting(None, "GPT2_THREADS", "torch intra-op threads (none or 0: torch's choice)")
    verbose: bool = setting(False, None, "log at DEBUG level", flag=("-v", "--verbose"))


@dataclasses.dataclass
class ModelConfig(ProcessConfig):
    """The settings of every process that holds a model: the server, the split client, the baseline."""

    model: str = setting(
        "gpt2",
        "GPT2_MODEL",
        "hub id (gpt2, gpt2-medium, distilgpt2), a local directory, or random:gpt2 / random:gpt2-medium / "
        "random:tiny / trained:kjv",
    )
    models_dir: str = setting("models", "GPT2_MODELS_DIR", "where hub downloads and presets are kept")
    fallback_random: bool = setting(
        False, "GPT2_FALLBACK_RANDOM", "if the default gpt2 can't be downloaded, use random:gpt2 (loudly)"
    )
    device: str = setting("auto", "GPT2_DEVICE", "auto, cpu or cuda[:N]")
    dtype: str = setting(
        "auto", "GPT2_DTYPE", "auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16"
    )
    attn: str = setting("sdpa", "GPT2_ATTN", "attention implementation", choices=["sdpa", "eager"])
    cuda_graphs: str = setting(
        "on", "GPT2_CUDA_GRAPHS", "decode steps as CUDA graphs on a GPU (no effect on the CPU)", choices=["on", "off"]
    )
    compress: str = setting(
        "none",
        "GPT2_COMPRESS",
        "compress this process's blocks at load: none, prune:P (fraction P of each linear weight, by magnitude), "
        "prune24 (2:4 sparsity) or int8 (the server: its trunk; the client: its bottom, top and drafts; the "
        "baseline: the whole model)",
    )


@dataclasses.dataclass
class GenerateConfig(ModelConfig):
    """A process that generates: the model settings and an adapter to generate with."""

    adapter: tuple[str, ...] = setting(
        (),
        "GPT2_ADAPTER",
        "a LoRA adapter in PEFT's format (from `python -m client train`): NAME=DIR, or DIR (named after it); may be "
        "given several times. The API serves each as a model of that name; the first is the default elsewhere",
    )


def parse_adapters(specs, reserved: str = "") -> dict[str, str]:
    """--adapter values (NAME=DIR or DIR; one string or several) -> {name: directory}, in order; a readable error
    for a repeated name or one that is `reserved` (the base model's)."""
    specs = (specs,) if isinstance(specs, str) else tuple(specs or ())
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise InvalidInput(f"--adapter '{spec}': give NAME=DIR or DIR")
        if name in out or name == reserved:
            raise InvalidInput(f"--adapter: the name '{name}' is given twice (or is the base model's); name each one")
        out[name] = path
    return out


def is_loopback(host: str) -> bool:
    """Whether a host (a name, an IPv4 or IPv6 address, bracketed or not) is this machine's loopback."""
    host = host.strip().strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclasses.dataclass
class DistillConfig:
    """Settings of `python -m client distill` (splitcore/distill.py)."""

    teacher: str = ""  # model spec of the teacher (gpt2, a directory, trained:kjv...)
    data: str = ""  # a text file, or a directory of .txt/.md files, to distill on
    out: str = ""  # directory to save the student in (Hugging Face format); must not exist yet
    n_layer: int = 6  # blocks of the student
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # windows per step
    block_size: int = 128  # tokens per window
    lr: float = 5e-4  # AdamW learning rate (linear warm-up over 5%, then cosine to a tenth)
    temperature: float = 2.0  # T: softens both distributions of the KL term
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy
    seed: int = 0  # batches and nothing else (the student starts from the teacher's blocks)
    models_dir: str = "models"

    def check(self) -> None:
        for name in ("teacher", "data", "out"):
            if not getattr(self, name):
                raise InvalidInput(f"--{name} is required")
        if Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise InvalidInput(f"--out {self.out} exists and is not empty: choose a new directory")
        if self.n_layer < 1 or self.steps < 1 or self.batch_size < 1 or self.block_size < 2:
            raise InvalidInput("--n-layer, --steps and --batch-size must be >= 1, --block-size >= 2")
        if not (self.temperature > 0 and 0 <= self.alpha <= 1 and self.lr > 0):
            raise InvalidInput("need --temperature > 0, 0 <= --alpha <= 1 and --lr > 0")
