"""What the trunk could read: attacks on the hidden states that cross the cut, and the client's privacy meter.

The attacker is the trunk's honest-but-curious operator (docs/privacy.md). It knows the public weights, this
code and the client's defence settings; it does not know the client's text, noise draws or private weights.
It collects public text and runs the client's own bottom and defence over it (`Observer`), then learns to read
tokens back from what it observes. Each attack has `fit(public ids)` and `predict(observed states)`, and
`recovered` scores one on private text it never saw: the share of tokens read exactly at their position.

- `NearestNeighbour`: each state's nearest token + position embedding (wte + wpe). Nothing to learn.
- `LearnedInverter` (SIP-style, SplitLLM arXiv 2409.00960): a small bidirectional transformer over the
  sequence of observed states, its output tied to the public wte. Retrained for every (model, split, defence):
  one trained on clean states understates what it reads from defended ones.

The exact attacker (vocab matching through the bottom, MAP under noise) is in client/exact_attack.py, the
gradient attack on split training in client/gradient_attack.py.

`Adversary` is the client's own inverter in learned obfuscation (client/split_training.py): retrained alongside the
client's parts, which learn to defeat it. `PrivacyMeter` trains the inverter once per (model, split, defence,
public text), caches it under the models directory, and reads each prompt back from the states its generation
actually sent with the exact attacker, the inverter and the nearest neighbour: the trunk reads at least the most
that any of them reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from splitcore.defence import Noise
from splitcore.errors import InvalidInput
from splitcore.gpt2 import GPT2
from splitcore.training import fit as train_loop

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # step, steps, loss
METER_CONTEXT = 256  # the meter's inverter learns to read states at positions up to this (the exact attacker: all)
ATTACK_VOCABS = ("public", "all")  # the tokens the meter's attackers read among


def public_text(spec: str) -> str:
    """The attacker's public text: a text file, a directory of them, or bible:PASSAGES (Debian's bible-kjv)."""
    if not spec:
        raise InvalidInput("the privacy meter needs public text to train its attacker on: give --attack-data")
    if spec.startswith("bible:"):
        from splitcore.presets import kjv_text

        return kjv_text(spec.removeprefix("bible:"))
    from splitcore.training import read_text

    return read_text(spec, "attack data (or bible:PASSAGES)")[0]


def vocabulary(ids: torch.Tensor) -> torch.Tensor:
    """The sorted token ids that occur in `ids`: the classes of an inverter trained on that text."""
    return torch.unique(ids)


def windows(ids: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    """Consecutive windows (N, length) of a 1-D id tensor: what a client would send as prompts."""
    n = len(ids) // length if count is None else min(count, len(ids) // length)
    if n < 1:
        raise InvalidInput(f"text of {len(ids)} tokens is too short for windows of {length}")
    return ids[: n * length].view(n, length)


class Observer:
    """What the trunk sees for given token ids: the client's own bottom, then its defence, at the wire's dtype.
    The attacker's noise draws are its own (`seed`): it knows the mechanism, not the client's draws."""

    def __init__(self, bottom: GPT2, noise: Noise, wire_dtype: torch.dtype = torch.float32, seed: int = 0):
        self.bottom, self.noise, self.wire_dtype = bottom, noise, wire_dtype
        self.generator = torch.Generator(bottom.device).manual_seed(seed)  # the attacker's own draws

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bottom.hidden(ids.to(self.bottom.device))  # (B, T, C)
        z = self.noise.sample(h.shape, self.generator, h.device) if self.noise.scale > 0 else None
        return self.noise.apply(h, z).to(self.wire_dtype).float()


class Sent:
    """What the client really sends for token ids: its bottom, then its own defence with its secret (`Protect`), at
    the wire's dtype. `repeats` > 1: the same text sent that many times, averaged, as an attacker would."""

    def __init__(self, bottom: GPT2, protect, wire_dtype: torch.dtype = torch.float32, repeats: int = 1):
        self.bottom, self.protect, self.wire_dtype, self.repeats = bottom, protect, wire_dtype, repeats

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.bottom.device)
        h = self.bottom.hidden(ids)

        def send() -> torch.Tensor:
            return (h if self.protect is None else self.protect(h, ids)).to(self.wire_dtype).float()

        return torch.stack([send() for _ in range(self.repeats)]).mean(0)


class NearestNeighbour:
    """Each observed state read as the token whose embedding plus its position's is nearest (L2)."""

    name = "nearest neighbour"

    def __init__(self, wte: torch.Tensor, wpe: torch.Tensor):
        self.wte, self.wpe = wte.detach().float(), wpe.detach().float()

    def fit(self, public_ids: torch.Tensor, observe: Observer, progress: Progress | None = None) -> NearestNeighbour:
        return self  # knows the public embeddings; nothing to learn

    @torch.no_grad()
    def predict(self, states: torch.Tensor) -> torch.Tensor:
        """(B, T, C) states -> (B, T) token ids."""
        b, t, _ = states.shape
        wte, wpe = self.wte.to(states.device), self.wpe[:t].to(states.device)
        # |s - w - p|^2 = |s - p|^2 - 2 (s - p).w + |w|^2, per position
        x = states.float() - wpe  # (B, T, C)
        return (wte.pow(2).sum(-1) - 2 * x @ wte.T).argmin(-1)


@dataclass(frozen=True)
class InverterConfig:
    """The learned inverter's size and training budget."""

    width: int = 256  # the transformer's width
    layers: int = 2
    heads: int = 4
    steps: int = 600  # optimizer steps (trained:kjv at cut 2: 69% at 400, 76 s on 2 CPU cores)
    batch_size: int = 16  # windows per step
    block_size: int = 64  # tokens per window
    lr: float = 3e-3  # peak, after a linear warm-up, cosine to a tenth
    seed: int = 0
    context: int = 64  # positions sent per window; past block_size, it trains on a window of them anywhere in it


class LearnedInverter(nn.Module):
    """A bidirectional transformer from observed states (B, T, C) to token logits, tied to the public wte.

    It reads tokens among `classes` (default: all): `vocabulary(public ids)` gives the tokens of the attacker's
    public text, which trains several times faster than the whole vocabulary and gives up only private tokens
    that the public text never shows (3% of the New Testament against the Old)."""

    name = "learned inverter"

    def __init__(
        self, wte: torch.Tensor, d_in: int, cfg: InverterConfig = InverterConfig(), classes: torch.Tensor | None = None
    ):
        super().__init__()
        self.cfg = cfg
        classes = torch.arange(wte.shape[0]) if classes is None else classes.long()
        self.register_buffer("classes", classes)  # saved with the inverter
        self.register_buffer("wte", wte.detach().float()[classes].clone(), persistent=False)  # public: not trained
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, self.wte.shape[1]))
        self.bias = nn.Parameter(torch.zeros(self.wte.shape[0]))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, vocab) logits. No position embedding: the states carry their positions."""
        return self.out(self.body(self.inp(states.float()))) @ self.wte.T + self.bias

    def fit(self, public_ids: torch.Tensor, observe: Observer, progress: Progress | None = None) -> LearnedInverter:
        """Train on random windows of public text sent through `observe`, fresh noise every batch."""
        c = self.cfg
        if len(public_ids) < 2 * max(c.context, c.block_size):
            raise InvalidInput(f"{len(public_ids)} tokens of public text: too little to train an attacker on")
        g = torch.Generator().manual_seed(c.seed)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            span = max(c.context, c.block_size)
            starts = torch.randint(0, len(public_ids) - span, (c.batch_size,), generator=g).tolist()
            ids = torch.stack([public_ids[s : s + span] for s in starts])
            states = observe(ids)
            if span > c.block_size:  # a window of the states, anywhere in the context
                o = int(torch.randint(0, span - c.block_size + 1, (1,), generator=g))
                ids, states = ids[:, o : o + c.block_size], states[:, o : o + c.block_size]
            return states, ids

        return self._train(batch, c.steps, progress)

    def fit_pairs(self, states: torch.Tensor, ids: torch.Tensor, steps: int) -> LearnedInverter:
        """Train further on observed windows whose tokens the attacker has read some other way: `states` (N, T,
        C) and `ids` (N, T), -1 where it has no token (what the trunk collects over split training: the states
        the client sends, and the tokens that the gradient gives back)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 1)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.randint(0, len(states), (self.cfg.batch_size,), generator=g)
            return states[rows], ids[rows]

        return self._train(batch, steps, None)

    def _train(self, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int, progress) -> LearnedInverter:
        """AdamW with a warm-up and a cosine to a tenth over `steps` batches of (states, ids); ids that are -1 or
        not among the classes are not scored."""
        c = self.cfg
        torch.manual_seed(c.seed)
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=0.01)

        def loss_of(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float]:
            states, ids = pair
            flat = ids.flatten().to(self.wte.device)
            target = torch.searchsorted(self.classes, flat.clamp_min(0)).clamp_max(len(self.classes) - 1)
            target[(flat < 0) | (self.classes[target] != flat)] = -100  # no token, or one it does not read
            loss = F.cross_entropy(self(states.to(self.wte.device)).flatten(0, 1), target, ignore_index=-100)
            return loss, float(loss.detach())

        self.train()
        report = None if progress is None else (lambda step, loss: progress(step, steps, loss))
        train_loop(self, opt, steps, c.lr, 20, lambda step: batch(), loss_of, report, clip=None)
        return self.eval()

    @torch.no_grad()
    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return self.classes[self(states.to(self.wte.device)).argmax(-1)]


def recovered(attack, observe: Observer | Sent, private_ids: torch.Tensor, batch: int = 16) -> float:
    """The share of private tokens `attack` reads exactly at their position, over windows (N, T) of private
    text sent through `observe`."""
    hits = total = 0
    for i in range(0, len(private_ids), batch):
        ids = private_ids[i : i + batch]
        pred = attack.predict(observe(ids)).cpu()
        hits += int((pred == ids).sum())
        total += ids.numel()
    return hits / total


# --- the meter ----------------------------------------------------------------------------------------------
@dataclass
class Reading:
    """A prompt as the trunk's best attacker reads it from what was sent."""

    token_ids: list[int]  # the prompt's
    read_ids: list[int]  # what the inverter read at each position
    share: float  # of the prompt's tokens read exactly
    attacker: str  # who read it, and what it trained on

    @property
    def hits(self) -> list[bool]:
        return [a == b for a, b in zip(self.token_ids, self.read_ids, strict=True)]

    def to_json(self, decode: Callable[[list[int]], str]) -> dict:
        return {
            "recovered_share": self.share,
            "recovered_tokens": sum(self.hits),
            "prompt_tokens": len(self.token_ids),
            "read_text": decode(self.read_ids),
            "attacker": self.attacker,
        }

    def segments(self, decode: Callable[[list[int]], str]) -> list[tuple[str, str]]:
        """The prompt as read, token by token, each labelled 'read' (exactly the prompt's) or 'wrong'."""
        return [(decode([r]), "read" if hit else "wrong") for r, hit in zip(self.read_ids, self.hits, strict=True)]


def state_digest(part: nn.Module) -> str:
    """A short digest of a part's weights (a privately trained bottom has no published digest)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(part.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inverter_key(weights_digest: str, split: str, noise: Noise, wire: str, public: str, cfg: InverterConfig) -> str:
    """What an inverter depends on: the bottom's weights, the cut, the defence, the wire, the data, the recipe."""
    text = json.dumps([weights_digest, split, noise.label(), wire, public, asdict(cfg)])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class PrivacyMeter:
    """Reads each prompt back from the states a generation sent, as the trunk's strongest attacker here could:
    - the exact attacker (client/exact_attack.py), through the bottom that generation ran (its adapter's, if that
      trained the bottom), MAP under the noise with the public model as its prior, at every position up to the
      model's context; it tries the learned inverter's best `candidates` guesses at each position, or every token
      of the attacker's vocabulary (`candidates` = 0);
    - a learned inverter trained for this client's model, split and defence on public text (once, then loaded
      from `cache_dir`), and the nearest neighbour.
    The reading reported is the one that reads the most: the trunk reads at least that much.

    With an adapter that trained the client's bottom (learned obfuscation), the attackers have the client's
    weights: the worst case, and so what the meter reports. `vocab`: "public", the tokens of the public text, or
    "all", the whole vocabulary (names and numbers the public text lacks)."""

    def __init__(
        self,
        engine,
        attack_data: str,
        cache_dir: Path,
        cfg: InverterConfig = InverterConfig(),
        vocab: str = "public",
        candidates: int = 128,
    ):
        if vocab not in ATTACK_VOCABS:
            raise InvalidInput(f"unknown attack vocabulary '{vocab}'; choose one of {', '.join(ATTACK_VOCABS)}")
        if candidates < 0:
            raise InvalidInput(f"the exact attacker's candidates must be >= 0, got {candidates}")
        self.engine, self.cfg, self.vocab, self.candidates = engine, cfg, vocab, candidates
        self.tokens_text = attack_data
        self.bottom = self._bottom(None)
        self.observer = Observer(self.bottom, engine.noise, engine.wire_dtype, seed=cfg.seed + 1)
        key = inverter_key(self._weights(self.bottom), str(engine.split), engine.noise, str(engine.wire_dtype),
                           f"{attack_data} vocab:{vocab}", cfg)  # fmt: skip
        self.path = Path(cache_dir) / "privacy" / f"inverter-{key}.pt"
        self.inverter: LearnedInverter | None = None
        self.public_ids: torch.Tensor | None = None
        self._prior: GPT2 | None = None
        self.report: dict = {}

    def _bottom(self, adapter: str | None) -> GPT2:
        """The bottom a generation with `adapter` runs (None: the default adapter; "": none)."""
        a = self.engine.adapter_named(adapter)
        return (a.parts if a is not None else self.engine.parts)["bottom"]

    def _weights(self, bottom: GPT2) -> str:
        """What the attackers' states depend on: the public weights, the client's own bottom if it trained one,
        and the compression it runs."""
        weights = self.engine.fingerprint.weights
        if bottom is not self.engine.parts["bottom"]:
            weights += f"+{state_digest(bottom)}"
        if self.engine.compression.active:  # the attacker trains through the bottom as it runs: compressed
            weights += f"+{self.engine.compression}"
        return weights

    def prepare(self, progress: Progress | None = None) -> PrivacyMeter:
        """Load the cached inverter, or train it (minutes) on the public text and cache it."""
        bottom = self.bottom
        self.public_ids = torch.tensor(self.engine.encode(public_text(self.tokens_text)), dtype=torch.long)
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=True)
            classes = saved["state"]["classes"]
            self.inverter = LearnedInverter(bottom.wte.weight, bottom.config.n_embd, self.cfg, classes)
            self.inverter.load_state_dict(saved["state"])
            self.inverter.eval()
            self.report = json.loads(saved["report"])
            logger.info("privacy meter: inverter loaded from %s", self.path)
            return self
        ids = self.public_ids
        t0 = time.perf_counter()
        classes = vocabulary(ids) if self.vocab == "public" else None
        self.inverter = LearnedInverter(bottom.wte.weight, bottom.config.n_embd, self.cfg, classes)
        self.inverter.fit(ids, self.observer, progress)
        self.report = {
            "attacker": "learned inverter",
            "trained_on": self.tokens_text,
            "public_tokens": len(ids),
            "vocabulary": self.vocab,
            "defence": self.engine.noise.label(),
            "split": str(self.engine.split),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "inverter": asdict(self.cfg),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"state": self.inverter.state_dict(), "report": json.dumps(self.report)}, tmp)
        tmp.replace(self.path)
        logger.info("privacy meter: inverter trained in %.0f s, saved in %s", self.report["train_seconds"], self.path)
        return self

    def _prior_model(self) -> GPT2:
        """The public model, whole: the exact attacker's prior under noise (loaded on first use)."""
        if self._prior is None:
            from splitcore.parts import load_full

            self._prior = load_full(self.engine.model, self.bottom.device)
        return self._prior

    def _exact(self, bottom: GPT2, states: torch.Tensor, own: bool) -> tuple[list[int], str]:
        from client.exact_attack import ExactAttacker

        noise = self.engine.noise
        prior = self._prior_model() if noise.scale > 0 else None
        classes = self.inverter.classes
        attacker = ExactAttacker(bottom, noise, prior, classes).fit(self.public_ids)
        shortlist, tried = None, f"every one of {len(classes)} tokens"
        if self.candidates and self.candidates < len(classes) and own:  # the inverter's best guesses
            with torch.no_grad():
                top = self.inverter(states.to(self.inverter.wte.device)).topk(self.candidates, -1).indices
            shortlist, tried = classes[top], f"the inverter's {self.candidates} best guesses"
        read = attacker.predict(states, shortlist)[0].tolist()
        return read, f"{attacker.name}, trying {tried} at each position"

    def read(self, prompt_ids: list[int], sent: torch.Tensor, adapter: str | None = None) -> Reading:
        """The prompt read back from `sent`, the states its prefill sent (1, T, C), by whichever attack reads
        more of it. `adapter`: the generation's (None: the default; "": none), whose bottom the attackers run."""
        n = len(prompt_ids)
        if sent.ndim != 3 or sent.shape[1] < n:
            raise InvalidInput(f"sent states of shape {list(sent.shape)} do not cover a prompt of {n} tokens")
        states = sent[:, :n].float()
        bottom = self._bottom(adapter)
        own = bottom is self.bottom  # the inverter was trained through this bottom
        exact, who = self._exact(bottom, states, own)
        readings = [self._reading(prompt_ids, exact, who)]
        if own:
            public = f"trained on {self.report.get('public_tokens', '?')} public tokens ({self.tokens_text})"
            inverted = self.inverter.predict(states)[0].tolist()
            readings.append(self._reading(prompt_ids, inverted, f"learned inverter {public}"))
        nearest = NearestNeighbour(bottom.wte.weight, bottom.wpe.weight).predict(states)[0].tolist()
        readings.append(self._reading(prompt_ids, nearest, "nearest neighbour (wte + wpe)"))
        return max(readings, key=lambda r: r.share)  # the first, the exact attacker, on a tie

    @staticmethod
    def _reading(prompt_ids: list[int], read: list[int], who: str) -> Reading:
        share = sum(a == b for a, b in zip(prompt_ids, read, strict=True)) / len(prompt_ids)
        return Reading(list(prompt_ids), read, share, who)


def prepare_meter(engine) -> PrivacyMeter:
    """The engine's privacy meter, its attacker loaded or trained now (a progress bar on stderr meanwhile)."""
    from tqdm import tqdm

    cfg = engine.cfg
    context = min(METER_CONTEXT, engine.n_positions)  # prompts longer than a training window: read them too
    inverter = InverterConfig(steps=cfg.attack_steps, context=context)
    meter = PrivacyMeter(engine, cfg.attack_data, Path(cfg.models_dir), inverter, cfg.attack_vocab,
                         cfg.attack_candidates)  # fmt: skip
    if meter.path.is_file():
        return meter.prepare()
    public_text(cfg.attack_data)  # a missing file fails now, in one line
    logger.info(
        "privacy meter: training the attacker for %s, split %s, defence %s (once)",
        engine.model.spec,
        engine.split,
        engine.noise.label(),
    )
    with tqdm(total=meter.cfg.steps, desc="privacy meter: training the attacker (once)", unit="step") as bar:
        meter.prepare(lambda step, steps, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.2f}")))
    return meter


class Adversary:
    """Learned obfuscation (adversarial representation learning, as NoPeek and SplitLLM's defences): an inverter
    retrained alongside the client's parts on what they send, and a push on what they send away from it.

    Each step the parts descend the LM loss plus `weight` times the negative of the inverter's cross-entropy on
    what was sent, capped at the uniform guess's (log of its classes) so that the parts are not pushed past
    "the inverter reads nothing" into blowing their states up; then the inverter takes a step of its own on the
    same states. The trunk's operator never sees this inverter or the parts it shaped."""

    def __init__(self, wte: torch.Tensor, d: int, weight: float, classes: torch.Tensor | None, seed: int = 0):
        torch.manual_seed(seed + 7)
        cfg = InverterConfig(width=128, layers=2, heads=4)
        self.inverter = LearnedInverter(wte, d, cfg, classes).train()
        self.opt = torch.optim.AdamW(self.inverter.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.weight, self.cap = weight, math.log(len(self.inverter.classes))
        self.last_ce = float("nan")

    def _ce(self, sent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        target = torch.searchsorted(self.inverter.classes, ids.flatten().to(sent.device))
        known = self.inverter.classes[target.clamp_max(len(self.inverter.classes) - 1)] == ids.flatten()
        logits = self.inverter(sent).flatten(0, 1)
        return F.cross_entropy(logits[known], target[known])

    def push(self, sent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The gradient, with respect to what was sent, of -weight x the inverter's (capped) cross-entropy."""
        x = sent.detach().requires_grad_(True)
        with torch.enable_grad():
            ce = self._ce(x, ids)
            self.last_ce = float(ce.detach())
            if self.last_ce >= self.cap:
                return torch.zeros_like(sent)
            (-self.weight * ce).backward()
        self.inverter.zero_grad(set_to_none=True)
        return x.grad

    def learn(self, sent: torch.Tensor, ids: torch.Tensor) -> None:
        with torch.enable_grad():
            self._ce(sent, ids).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
