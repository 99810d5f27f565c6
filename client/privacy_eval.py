"""The privacy table: for each cut and defence, what the trunk's attackers read of private text, and what the
defence costs (perplexity, greedy agreement, decode time), side by side. Used by scripts/bench_privacy.py and
`python -m client privacy-report`.

Every row builds the client as a user would (SplitEngine with the row's split and defence, the trunk
in-process: the same parts and the same math as over gRPC, which the tests check equal), retrains the learned
inverter on public text through that client's bottom and defence, and scores it on private text it never saw.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from client.engine import ClientConfig, SplitEngine
from client.privacy import (
    InverterConfig,
    LearnedInverter,
    NearestNeighbour,
    Observer,
    public_text,
    recovered,
    vocabulary,
    windows,
)
from splitcore.sampling import SamplingParams

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)
CLIENT_SEED, ATTACKER_SEED = 1234, 4321  # the client's draws and the attacker's are never the same


@dataclass(frozen=True)
class Setting:
    """One row: a cut and a defence (ClientConfig's fields)."""

    split: str = "2,10"
    defence: str = "none"
    noise_scale: float = 0.0
    noise_clip: float = 0.0
    denoise: str = "none"  # none, or "subtract": the client takes its own noise out of the trunk's answer

    @property
    def label(self) -> str:
        if self.defence == "none":
            return f"none, cut {self.split}"
        clip = f" clip {self.noise_clip:g}" if self.noise_clip else ""
        den = f" + denoise {self.denoise}" if self.denoise != "none" else ""
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


def engine_for(model: str, models_dir: str, s: Setting) -> SplitEngine:
    cfg = ClientConfig(
        model=model,
        models_dir=models_dir,
        device="cpu",
        split=s.split,
        local_trunk=True,
        defence=s.defence,
        noise_scale=s.noise_scale,
        noise_clip=s.noise_clip,
        denoise=s.denoise,
        defence_seed=CLIENT_SEED,
    )
    return SplitEngine(cfg)


@torch.no_grad()
def split_perplexity(engine: SplitEngine, windows: torch.Tensor) -> float:
    """Perplexity of next-token prediction over (W, T) windows, through the engine's stepper: bottom, defence,
    trunk, top, exactly as a generation's prefill runs them."""
    losses = []
    for ids in windows:
        stepper = engine.new_stepper(len(ids))
        try:
            logits = stepper.step(ids[None], all_positions=True).logits  # (T, vocab)
        finally:
            stepper.close()
        losses.append(float(F.cross_entropy(logits[:-1].float(), ids[1:])))
    return math.exp(statistics.fmean(losses))


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


def evaluate(
    model: str,
    models_dir: str,
    s: Setting,
    texts: Texts,
    inverter: InverterConfig,
    tokens: int = 64,
    clean: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """One row of the table. `clean` caches each cut's undefended engine and perplexity between rows."""
    say = progress or (lambda m: logger.info("%s", m))
    clean = clean if clean is not None else {}
    if s.split not in clean:
        ref = engine_for(model, models_dir, Setting(s.split))
        clean[s.split] = (ref, split_perplexity(ref, texts.private))
    reference, ppl_clean = clean[s.split]
    engine = engine_for(model, models_dir, s) if s != Setting(s.split) else reference
    bottom = engine.parts["bottom"]
    observe = Observer(bottom, engine.noise, engine.wire_dtype, seed=ATTACKER_SEED)
    nn_share = recovered(NearestNeighbour(bottom.wte.weight, bottom.wpe.weight), observe, texts.private)
    say(f"{s.label}: training the learned inverter ({inverter.steps} steps)")
    t0 = time.perf_counter()
    inv = LearnedInverter(bottom.wte.weight, bottom.config.n_embd, inverter, vocabulary(texts.public))
    inv.fit(texts.public, observe)
    train_s = time.perf_counter() - t0
    inv_share = recovered(inv, observe, texts.private)
    ppl = split_perplexity(engine, texts.private) if engine is not reference else ppl_clean
    agree, ms, ms_ref = agreement_and_time(engine, reference, texts.prompts, tokens)
    row = {
        "setting": s.label,
        "split": s.split,
        "defence": engine.noise.label(),
        "denoise": s.denoise,
        "nearest_neighbour": nn_share,
        "learned_inverter": inv_share,
        "inverter_train_s": round(train_s, 1),
        "perplexity": ppl,
        "perplexity_undefended": ppl_clean,
        "perplexity_ratio": ppl / ppl_clean,
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
    "| setting | nearest neighbour reads | learned inverter reads | perplexity (x undefended) "
    "| greedy agreement, 64 tokens | decode ms/token (x undefended) |\n|---|---:|---:|---:|---:|---:|"
)


def format_row(r: dict) -> str:
    return (
        f"| {r['setting']} | {r['nearest_neighbour']:.1%} | {r['learned_inverter']:.1%} | "
        f"{r['perplexity']:.1f} ({r['perplexity_ratio']:.2f}x) | {r['greedy_agreement']:.0%} | "
        f"{r['decode_ms']:.2f} ({r['decode_ratio']:.2f}x) |"
    )


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])
