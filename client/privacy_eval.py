"""The privacy table: for each cut and defence, what the trunk's attackers read of private text, and what the
defence costs (perplexity, greedy agreement, decode time), side by side. Used by scripts/bench_privacy.py and
`python -m client privacy-report`.

Every row builds the client as a user would (SplitEngine with the row's split and defence, the trunk
in-process: the same parts and the same math as over gRPC, which the tests check equal), retrains the learned
inverter on public text through that client's bottom and defence, and scores it on private text it never saw.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client.config import ClientConfig
from client.exact_attack import ExactAttacker, floor
from client.privacy import (
    InverterConfig,
    LearnedInverter,
    NearestNeighbour,
    Observer,
    Sent,
    public_text,
    recovered,
    vocabulary,
    windows,
)
from client.split_engine import SplitEngine
from splitcore.models import resolve_model
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from splitcore.training import lm_loss, perplexity

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)
CLIENT_SEED, ATTACKER_SEED = 1234, 4321  # the client's draws and the attacker's are never the same
REPEATS = (4, 16)  # sends of the same text that an attacker averages
EXACT_WINDOWS = 16  # private windows the exact attacker reads (it runs the bottom over every candidate: slow)


@dataclass(frozen=True)
class Setting:
    """One row: a cut and a defence (ClientConfig's fields)."""

    split: str = "2,10"
    defence: str = "none"
    noise_scale: float = 0.0
    noise_clip: float = 0.0
    denoise: str = "none"  # none, or "subtract": the client takes its own noise out of the trunk's answer
    adapter: str | None = None  # the client's privately trained parts (learned obfuscation)
    attacker_adapter: str | None = None  # the attacker's own run of the same recipe; None: it has the client's
    attacker_pairs: str | None = None  # (states, tokens) the trunk collected over the client's training (train_split)
    name: str = ""  # what the row is called, when the rest does not say it

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name}, cut {self.split}"
        if self.defence == "none":
            return f"none, cut {self.split}"
        clip = f" clip {self.noise_clip:g}" if self.noise_clip else ""
        den = {"none": "", "subtract": " + denoise subtract"}.get(self.denoise, " + learned denoiser")
        return f"{self.defence} {self.noise_scale:g}{clip}{den}, cut {self.split}"


@dataclass
class Texts:
    """The attacker's public token ids, and the private windows it is scored on."""

    public: torch.Tensor  # (N,)
    private: torch.Tensor  # (W, T) for the attacks and the perplexity
    prompts: list[list[int]] = field(default_factory=list)  # for greedy agreement and decode time


def load_texts(encode, public: str, private: str, n_windows: int = 32, n_prompts: int = 20) -> Texts:
    """The attacker's public text, and from the private text: windows of 64 tokens to score and prompts of 16
    (spread over the rest of it) to generate from."""
    ids = torch.tensor(encode(public_text(private)), dtype=torch.long)
    scored = windows(ids, 64, n_windows)
    rest = ids[scored.numel() :]
    prompts = [rest[i * 97 : i * 97 + 16].tolist() for i in range(n_prompts) if len(rest) >= i * 97 + 16]
    return Texts(torch.tensor(encode(public_text(public)), dtype=torch.long), scored, prompts)


def engine_for(model: str, models_dir: str, s: Setting, server: str | None = None) -> SplitEngine:
    """The client of row `s`, its trunk in-process (or on `server`)."""
    cfg = ClientConfig(
        model=model,
        models_dir=models_dir,
        device="cpu",
        split=s.split,
        local_trunk=server is None,
        server=server or "localhost:50051",
        defence=s.defence,
        noise_scale=s.noise_scale,
        noise_clip=s.noise_clip,
        denoise=s.denoise,
        adapter=s.adapter,
        defence_seed=CLIENT_SEED,
    )
    return SplitEngine(cfg)


def bottom_of(engine: SplitEngine, adapter: str | None = None):
    """The bottom a client runs: the engine's, with its adapter (trained parts) if any, or with `adapter`."""
    if adapter is not None:
        return engine.load_adapter(adapter).parts["bottom"]
    return (engine.adapter.parts if engine.adapter is not None else engine.parts)["bottom"]


def _perplexity(windows: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Perplexity of next-token prediction over (W, T) windows, `logits_of` giving a window's (1, T, vocab)."""
    with torch.no_grad():
        return perplexity(statistics.fmean(float(lm_loss(logits_of(ids[None]), ids[None])) for ids in windows))


def split_perplexity(engine: SplitEngine, windows: torch.Tensor) -> float:
    """Perplexity through the engine's stepper: bottom, defence, trunk, repair and top, exactly as a
    generation's prefill runs them."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        stepper = engine.new_stepper(ids.shape[1])
        try:
            return stepper.step(ids, all_positions=True).logits[None]  # (1, T, vocab)
        finally:
            stepper.close()

    return _perplexity(windows, logits_of)


def perplexity_without_trunk(engine: SplitEngine, windows: torch.Tensor) -> float:
    """Perplexity with no trunk at all: the client's top on its bottom's output (its repair, if it learned one,
    given the clean states in place of the trunk's answer). A defended split that does no better than this
    gets nothing from its trunk."""
    parts = engine.adapter.parts if engine.adapter is not None else engine.parts

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        clean = parts["bottom"](ids)
        return parts["top"](engine.repair(clean, clean, clean) if engine.repair else clean, all_positions=True)

    return _perplexity(windows, logits_of)


def agreement_and_time(defended: SplitEngine, reference: SplitEngine, prompts: list[list[int]], n: int):
    """Greedy agreement of `defended` with `reference` over `n` tokens per prompt (the share of positions with
    the same token), and the median decode ms/token of each, runs interleaved."""
    same, times = [], {"defended": [], "reference": []}
    for ids in prompts:
        a = defended.run(ids, n, GREEDY)
        b = reference.run(ids, n, GREEDY)
        same.append(sum(x == y for x, y in zip(a.token_ids, b.token_ids, strict=False)) / n)
        times["defended"] += a.stats.decode_ms
        times["reference"] += b.stats.decode_ms
    return statistics.fmean(same), statistics.median(times["defended"]), statistics.median(times["reference"])


def public_model(model: str, models_dir: str, clean: dict):
    """The public full model (the exact attacker's prior), loaded once per table."""
    if "public model" not in clean:
        clean["public model"] = load_full(resolve_model(model, models_dir))
    return clean["public model"]


def attack_floor(model: str, models_dir: str, texts: Texts, clean: dict | None = None) -> dict:
    """The floor of every attacker on the scored windows: what it reads with nothing observed."""
    clean = clean if clean is not None else {}
    share, how = floor(texts.public, texts.private, public_model(model, models_dir, clean), vocabulary(texts.public))
    return {"floor": share, "floor_reader": how}


def _attacks(model, models_dir, s: Setting, texts: Texts, inverter: InverterConfig, engine, reference, clean: dict,
             say, exact_windows: int, beam: int) -> dict:  # fmt: skip
    """What each attacker reads of the private text from what `engine` sends: the row's attack columns."""
    bottom, public = bottom_of(engine), reference.parts["bottom"]  # the client's; the public weights
    observe = Sent(bottom, engine.protect, engine.wire_dtype)  # what the client sends, its own secret noise on
    nn_share = recovered(NearestNeighbour(public.wte.weight, public.wpe.weight), observe, texts.private)
    # the attacker's training states: through the client's own bottom (worst case), or its own run of the recipe
    mine = bottom if s.attacker_adapter is None else bottom_of(reference, s.attacker_adapter)
    train_on = Observer(mine, engine.noise, engine.wire_dtype, seed=ATTACKER_SEED)
    say(f"{s.label}: training the learned inverter ({inverter.steps} steps)")
    t0 = time.perf_counter()
    inv = LearnedInverter(public.wte.weight, public.config.n_embd, inverter, vocabulary(texts.public))
    inv.fit(texts.public, train_on)
    if s.attacker_pairs is not None:  # then on what it collected through the client's own bottom
        pairs = torch.load(s.attacker_pairs)
        say(f"{s.label}: the inverter trains on {int((pairs['ids'] >= 0).sum())} pairs read through training")
        inv.fit_pairs(pairs["states"], pairs["ids"], inverter.steps)
    train_s = time.perf_counter() - t0
    inv_share = recovered(inv, observe, texts.private)
    # every private window sent k times (a retry, a resent history), the sends averaged by the attacker
    repeats = {k: recovered(inv, Sent(bottom, engine.protect, engine.wire_dtype, k), texts.private) for k in REPEATS}
    # the exact attacker: vocab matching through the bottom it has, MAP under the noise with the public prior
    exact = ExactAttacker(mine, engine.noise, public_model(model, models_dir, clean), vocabulary(texts.public), beam)
    scored = texts.private[:exact_windows]
    say(f"{s.label}: the exact attacker reads {scored.numel()} tokens")
    t0 = time.perf_counter()
    exact_share = recovered(exact.fit(texts.public), observe, scored)
    exact_s = time.perf_counter() - t0
    return {
        "nearest_neighbour": nn_share,
        "learned_inverter": inv_share,
        **{f"learned_inverter_{k}_repeats": share for k, share in repeats.items()},
        "inverter_train_s": round(train_s, 1),
        "exact": exact_share,
        "exact_attacker": exact.name,
        "exact_tokens": scored.numel(),
        "exact_s": round(exact_s, 1),
    }


def evaluate(
    model: str,
    models_dir: str,
    s: Setting,
    texts: Texts,
    inverter: InverterConfig,
    tokens: int = 64,
    clean: dict | None = None,
    progress: Callable[[str], None] | None = None,
    exact_windows: int = EXACT_WINDOWS,
    beam: int = 1,
) -> dict:
    """One row of the table. `clean` caches each cut's undefended engine and perplexity, and the public model,
    between rows."""
    say = progress or (lambda m: logger.info("%s", m))
    clean = clean if clean is not None else {}
    if s.split not in clean:
        ref = engine_for(model, models_dir, Setting(s.split))
        clean[s.split] = (ref, split_perplexity(ref, texts.private))
    reference, ppl_clean = clean[s.split]
    engine = engine_for(model, models_dir, s) if s != Setting(s.split) else reference
    read = _attacks(model, models_dir, s, texts, inverter, engine, reference, clean, say, exact_windows, beam)
    ppl = split_perplexity(engine, texts.private) if engine is not reference else ppl_clean
    agree, ms, ms_ref = agreement_and_time(engine, reference, texts.prompts, tokens)
    row = {
        "setting": s.label,
        "split": s.split,
        "defence": engine.noise.label(),
        "denoise": s.denoise,
        "adapter": s.adapter,
        "attacker_adapter": s.attacker_adapter,
        "attacker": "has the client's weights"
        if s.attacker_adapter is None
        else "knows the recipe, not the weights" + (", and reads the client's training" if s.attacker_pairs else ""),
        "attacker_pairs": s.attacker_pairs,
        **read,
        "strongest": max(read["nearest_neighbour"], read["learned_inverter"], read["exact"]),
        "perplexity": ppl,
        "perplexity_undefended": ppl_clean,
        "perplexity_ratio": ppl / ppl_clean,
        "perplexity_without_trunk": perplexity_without_trunk(engine, texts.private),
        "greedy_agreement": agree,
        "decode_ms": ms,
        "decode_ms_undefended": ms_ref,
        "decode_ratio": ms / ms_ref,
    }
    say(format_row(row))
    if engine is not reference:
        engine.close()
    return row


HEADER = (
    "| setting | the trunk reads at least | exact attacker | learned inverter | its 4 / 16 sends averaged "
    "| nearest neighbour | perplexity (x undefended) | the same client without its trunk "
    "| greedy agreement, 64 tokens | decode ms/token (x undefended) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _share(r: dict, key: str) -> str:
    return f"{r[key]:.1%}" if r.get(key) is not None else "-"


def format_row(r: dict) -> str:
    alone = r.get("perplexity_without_trunk")
    alone = f"{alone:.1f} ({alone / r['perplexity_undefended']:.2f}x)" if alone else "-"
    repeats = " / ".join(_share(r, f"learned_inverter_{k}_repeats") for k in REPEATS)
    return (
        f"| {r['setting']} | **{_share(r, 'strongest')}** | {_share(r, 'exact')} | {r['learned_inverter']:.1%} "
        f"| {repeats} | {r['nearest_neighbour']:.1%} | {r['perplexity']:.1f} ({r['perplexity_ratio']:.2f}x) "
        f"| {alone} | {r['greedy_agreement']:.0%} | {r['decode_ms']:.2f} ({r['decode_ratio']:.2f}x) |"
    )


def table(rows: list[dict], floor: dict | None = None) -> str:
    lines = [HEADER, *(format_row(r) for r in rows)]
    if floor:
        who = f"nothing observed (the floor: {floor['floor_reader']})"
        lines.append(f"| {who} | {floor['floor']:.1%} | | | | | | | | |")
    return "\n".join(lines)


def train_split(
    model: str,
    models_dir: str,
    server: str,
    s: Setting,
    text: str,
    out: str,
    steps: int,
    seed: int,
    client_train: str = "full",
    privacy_weight: float = 0.0,
    progress: Callable[[str], None] | None = None,
    pairs_to: str | None = None,
    collect_steps: int = 0,
) -> str:
    """`python -m client train` with the row's cut and defence over the trunk at `server`, on `text`; returns
    the adapter directory. Learned obfuscation: client_train full with a privacy weight (the client's private
    parts). Noise-aware fine-tuning: client_train none under noise (the trunk's LoRA learns to work through
    it; the bottom stays the public one, so what crosses is as private as with the noise alone). `pairs_to`: the
    trunk's operator keeps, over the last `collect_steps` steps, the states sent and the tokens that the gradient
    attack reads from each step (through the public top), and saves them there: an attacker that learns the
    client's private bottom from its training traffic."""
    from client.split_training import Run, SplitTrainer, TrainConfig
    from splitcore.training import TextData

    say = progress or (lambda m: logger.info("%s", m))
    f = _text_file(text)
    engine = engine_for(model, models_dir, s, server)
    cfg = TrainConfig(
        data=str(f), steps=steps, batch_size=8, block_size=64, lr=5e-4 if client_train == "full" else 1e-3,
        eval_every=0, eval_batches=2, out=out, client_train=client_train, seed=seed, privacy_weight=privacy_weight,
    )  # fmt: skip
    data = TextData.from_path(f, engine.encode, cfg.block_size)
    classes = vocabulary(data.train) if privacy_weight > 0 else None
    trainer = SplitTrainer(engine, cfg.lora(), client_train, None, privacy_weight, classes)
    pairs = _Pairs(trainer, engine_for(model, models_dir, Setting(s.split)), engine) if pairs_to else None
    try:
        for ev in Run(trainer, data, cfg, model):
            if pairs is not None and ev.kind == "step":
                pairs.step(ev.step, ev.step > steps - collect_steps, say, out)
            if ev.kind == "step" and ev.step % 50 == 0:
                adv = f", the adversary's cross-entropy {trainer.adversary.last_ce:.3f}" if trainer.adversary else ""
                say(f"training {out} (seed {seed}): step {ev.step}/{steps}, LM loss {ev.stats.loss:.3f}{adv}")
    finally:
        trainer.close()
        engine.close()
    if pairs is not None:
        pairs.save(pairs_to)
    return out


def _text_file(text: str) -> Path:
    """`text` in a file of a temporary directory of its own (what `python -m client train` reads)."""
    import tempfile

    f = Path(tempfile.mkdtemp(prefix="split-train-")) / "text.txt"
    f.write_text(text, encoding="utf-8")
    return f


class _Pairs:
    """The trunk's operator keeping (state sent, token the gradient attack reads) over a client's training steps,
    through the public top (`public`: the public engine) and the client's gradient settings."""

    def __init__(self, trainer, public, engine):
        from client.gradient_attack import GradientLabels, StepTap

        self.public = public
        self.attack = GradientLabels(public.parts["top"], engine.cfg.grad_noise_defence())
        trainer.remote = self.tap = StepTap(trainer.remote)
        self.states: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def step(self, step: int, keep: bool, say, out: str) -> None:
        (out_h, grad), sent = self.tap.steps.pop(), self.tap.sent.pop()
        if keep:
            labels = self.attack.read(out_h, grad)  # (B, T-1): the tokens at positions 1..T-1
            self.states.append(sent.float())
            self.ids.append(torch.cat([torch.full_like(labels[:, :1], -1), labels], 1))
            if step % 10 == 0:
                say(f"training {out}: step {step}, the trunk collected {len(self.ids) * len(sent)} windows of "
                    "(state, token read from the gradient)")  # fmt: skip

    def save(self, path: str) -> None:
        self.public.close()
        torch.save({"states": torch.cat(self.states), "ids": torch.cat(self.ids)}, path)


# --- training gradients --------------------------------------------------------------------------------------
GRADIENT_HEADER = (
    "| split training | labels the gradient attack reads | tokens the exact attacker reads from the states "
    "| the trunk reads at least | held-out perplexity after the steps (x undefended) | the attacks' s/step |\n"
    "|---|---:|---:|---:|---:|---:|"
)


def gradient_row(
    model: str,
    models_dir: str,
    server: str,
    client_train: str,
    grad_noise: float,
    train_text: str,
    heldout: torch.Tensor,
    steps: int,
    read_at: tuple[int, ...],
    progress: Callable[[str], None] | None = None,
    state_noise: float = 0.0,
    public_ids: torch.Tensor | None = None,
    grad_clip: float = 0.0,
) -> dict:
    """Split training over the trunk at `server` on `train_text` (the client's private text) for `steps` steps
    with the client's settings (gaussian `state_noise` on the states sent, `grad_noise` on the gradient, clipped
    to an RMS of `grad_clip` first), the trunk's operator reading the steps in `read_at` two ways: the labels from
    its output and the gradient sent back, through the public top, and, given `public_ids` (its public text), the
    same tokens from the states sent, by the exact attacker. Then the perplexity on `heldout` windows (W, T)."""
    from client.gradient_attack import GradientLabels

    say = progress or (lambda m: logger.info("%s", m))
    defence = {"defence": "gaussian", "noise_scale": state_noise} if state_noise else {}
    engine = SplitEngine(
        settings := ClientConfig(model=model, models_dir=models_dir, device="cpu", server=server, grad_noise=grad_noise,
                                 grad_clip=grad_clip, defence_seed=CLIENT_SEED if grad_noise or state_noise else None,
                                 **defence)
    )  # fmt: skip
    public = engine_for(model, models_dir, Setting())  # the attacker's: the public weights
    attack = GradientLabels(public.parts["top"], settings.grad_noise_defence())  # it knows the client's settings
    states = None
    if public_ids is not None:
        states = ExactAttacker(public.parts["bottom"], engine.noise, load_full(public.model), vocabulary(public_ids))
        states.fit(public_ids)
    name = _gradient_setting(client_train, grad_noise, grad_clip, state_noise)
    try:
        hits, total, state_hits, attack_s, loss = _train_and_read(
            engine, client_train, train_text, steps, read_at, heldout, attack, states, lambda m: say(f"{name}: {m}")
        )
    finally:
        engine.close()
        public.close()
    return {
        "setting": name,
        "client_train": client_train,
        "grad_noise": grad_noise,
        "grad_clip": grad_clip,
        "state_noise": state_noise,
        "states_read": state_hits if states is not None else None,
        "states_share": state_hits / total if states is not None else None,
        "at_least": max(hits, state_hits) / total,
        "steps": steps,
        "read_at_steps": list(read_at),
        "labels_read": hits,
        "labels": total,
        "share": hits / total,
        "perplexity": perplexity(loss),
        "attack_s_per_step": statistics.fmean(attack_s),
    }


def _train_and_read(engine, client_train: str, text: str, steps: int, read_at, heldout, attack, states, say):
    """Split training on `text` through `engine`, read as `_read_training` says; then the held-out loss."""
    from client.gradient_attack import StepTap
    from client.split_training import SplitTrainer, TrainConfig
    from splitcore.training import TextData

    f = _text_file(text)
    cfg = TrainConfig(data=str(f), steps=steps, batch_size=8, block_size=64, lr=1e-3, client_train=client_train)
    trainer = SplitTrainer(engine, cfg.lora(), client_train)
    trainer.remote = tap = StepTap(trainer.remote)
    try:
        data = TextData.from_path(f, engine.encode, cfg.block_size)
        read = _read_training(trainer, tap, data, attack, states, steps, read_at, say)
        with torch.no_grad():
            loss = statistics.fmean(trainer.eval_loss(heldout[i : i + 8]) for i in range(0, len(heldout), 8))
    finally:
        trainer.close()
    return (*read, loss)


def _read_training(trainer, tap, data, attack, states, steps: int, read_at: tuple[int, ...], say):
    """Train `steps` steps of 8 windows; at the steps in `read_at`, the trunk's operator reads their labels from
    the gradient (`attack`) and, with `states` (an exact attacker), the same tokens from the states sent:
    (labels read from the gradient, labels, tokens read from the states, the attack's s at each step read)."""
    hits = total = state_hits = 0
    attack_s = []
    for step in range(1, steps + 1):
        ids = data.batch(step, 8, seed=1)
        trainer.step(step, ids)
        (out, grad), sent = tap.steps.pop(), tap.sent.pop()
        if step in read_at:
            t0 = time.perf_counter()
            hits += int((attack.read(out, grad) == ids[:, 1:]).sum())
            total += ids[:, 1:].numel()
            if states is not None:  # the same tokens (positions 1..T-1) read from the states sent
                state_hits += int((states.predict(sent)[:, 1:] == ids[:, 1:]).sum())
            attack_s.append(time.perf_counter() - t0)
            say(f"step {step}, {hits}/{total} read from the gradient, {state_hits} from the states")
    return hits, total, state_hits, attack_s


def _gradient_setting(client_train: str, grad_noise: float, grad_clip: float, state_noise: float) -> str:
    name = f"--client-train {client_train}" + (f" --grad-noise {grad_noise:g}" if grad_noise else "")
    name += f" --grad-clip {grad_clip:g}" if grad_clip else ""
    name += f" --defence gaussian --noise-scale {state_noise:g}" if state_noise else ""
    return name + ("" if grad_noise or state_noise or grad_clip else ", undefended")


def format_gradient_row(r: dict, undefended_ppl: float) -> str:
    states = f"{r['states_read']} ({r['states_share']:.1%})" if r.get("states_read") is not None else "-"
    least = f"**{r['at_least']:.1%}**" if r.get("states_read") is not None else "-"
    return (
        f"| {r['setting']} | {r['labels_read']} of {r['labels']} ({r['share']:.1%}) | {states} | {least} | "
        f"{r['perplexity']:.1f} ({r['perplexity'] / undefended_ppl:.2f}x) | {r['attack_s_per_step']:.0f} |"
    )
