"""Engines: tokenizer + model + the generation loop; the full-model engine and the base of the split one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitcore.compress import Compression
from splitcore.cudagraph import DecoderPool
from splitcore.device import configure_attention
from splitcore.errors import InvalidInput
from splitcore.generate import (
    FullStepper,
    PromptLogprobs,
    Stepper,
    TokenEvent,
    check_request,
    generate,
    score,
)
from splitcore.lora import adapted, load_client_weights, load_peft
from splitcore.models import ResolvedModel, load_tokenizer
from splitcore.parts import load_full
from splitcore.sampling import SamplingParams
from splitcore.settings import parse_adapters
from splitcore.speculative import (
    DraftLength,
    ModelDraft,
    PromptLookup,
    Speculation,
    SpeculationStats,
    check_source,
)
from splitcore.stats import GenerationStats

logger = logging.getLogger(__name__)

Notify = Callable[[str], None]
Tap = Callable[[torch.Tensor], None]  # hears the hidden states of each step as they cross to the trunk


class Recorder:
    """A stepper's tap that keeps the first step's states (the prompt's prefill) as they crossed."""

    def __init__(self):
        self.prefill: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor) -> None:
        if self.prefill is None:
            self.prefill = h.detach().cpu()


@dataclass
class GenerationResult:
    """Everything one finished generation produced; `to_json` is the CLI's --json output."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_json(self, **extra) -> dict:
        return {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "stats": self.stats.to_dict(),
            **extra,
        }


class Engine:
    """Tokenises, runs the shared generation loop on a fresh stepper, detokenises. Subclasses make steppers."""

    def __init__(self, model: ResolvedModel, device: torch.device, dtype: torch.dtype, compress: str = "none"):
        self.model, self.device, self.dtype = model, device, dtype
        self.compression = Compression.parse(compress)  # of this process's blocks and its drafts
        self.tokenizer = load_tokenizer(model.path)
        self.n_positions = model.config.n_positions
        self._draft_models: dict[str, object] = {}  # draft:SPEC models, loaded once
        self._draft_lengths: dict[tuple[str, bool], DraftLength] = {}  # what each source learned, kept

    adapters: dict = {}  # name -> a loaded LoRA adapter, in the order given (the first is the default)
    BASE = ""  # the adapter name that means the base model, none

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapters)

    @property
    def default_adapter(self) -> str:
        """What a generation that names no adapter runs: the first one given (--adapter), else the base model."""
        return next(iter(self.adapters), self.BASE)

    def adapter_named(self, name: str | None):
        """The adapter `name` (None: the default; BASE: none), or a readable error."""
        name = self.default_adapter if name is None else name
        if name == self.BASE:
            return None
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none is loaded"
            raise InvalidInput(f"no adapter named '{name}' ({known})")
        return self.adapters[name]

    def new_stepper(
        self,
        max_length: int = 0,
        notify: Notify | None = None,
        tap: Tap | None = None,
        adapter: str | None = None,
        user: str = "",
    ) -> Stepper:
        """A fresh stepper (fresh caches) for one generation of at most `max_length` tokens, with the adapter
        named `adapter` (None: the default; BASE: the base model), for `user` (an API's: the split client keys its
        noise by it, so that the trunk cannot tell that two users sent the same text).

        `notify` hears what happens on the way that the caller may want to show (a lost trunk, a reconnect);
        `tap` hears what crosses to the trunk, step by step (nothing crosses in an unsplit engine)."""
        raise NotImplementedError

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int,
        params: SamplingParams,
        stats: GenerationStats | None = None,
        notify: Notify | None = None,
        speculate: str = "none",
        logprobs: int | None = None,
        tap: Tap | None = None,
        prompt_lps: PromptLogprobs | None = None,
        adapter: str | None = None,
        user: str = "",
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they are generated; `stats` (if given) fills in as they come; `notify` hears of a lost
        and regained trunk while the generation waits for it. `speculate` names a draft source (lookup, self):
        tokens verified several to a round trip, distributed as without (greedy: the same tokens). `logprobs` and
        `prompt_lps`: see `generate`. `tap`, `adapter` and `user`: see `new_stepper`; the adapter is this generation's
        alone, so that concurrent generations may each run their own."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_source(speculate)
        speculation = None
        if speculate != "none":
            stats = stats if stats is not None else GenerationStats()
            stats.speculation = SpeculationStats(speculate)
        stepper = self.new_stepper_checked(ids, max_new_tokens, params, notify, tap, adapter, user)
        if speculate != "none":
            try:
                draft = self.draft_source(speculate, len(ids) + max_new_tokens, adapter)
            except BaseException:
                stepper.close()
                raise
            length = self._draft_lengths.setdefault((speculate, params.greedy), DraftLength(8))  # acceptance differs
            speculation = Speculation.start(draft, params, stats.speculation, length)
        eos = self.tokenizer.eos_token_id
        yield from generate(
            stepper, ids, max_new_tokens, params, self.decode, eos, stats, logprobs, prompt_lps, speculation
        )

    def score(self, prompt: str | list[int], k: int = 0, adapter: str | None = None, user: str = "") -> PromptLogprobs:
        """The prompt's own log-probabilities, no token generated (an API request with max_tokens 0 and echo): each
        token after the first, under the model, with the k most likely tokens' at its position."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidInput("the prompt is empty: give at least one token of text")
        return score(self.new_stepper(len(ids), adapter=adapter, user=user), ids, k)

    draft_sources = ("none", "lookup")  # what `speculate` may name here (and draft:SPEC)

    def check_speculate(self, name: str) -> None:
        """Fail now, in one line, on a draft source this engine cannot use (an app checks its setting at start)."""
        check_source(name)
        if name not in self.draft_sources and not name.startswith("draft:"):
            raise InvalidInput(f"--speculate {name} is not available here; use one of {', '.join(self.draft_sources)}")
        if name.startswith("draft:"):
            self.draft_model(name.removeprefix("draft:"))

    def draft_model(self, spec: str):
        """The draft model `spec`, loaded once on this engine's device (splitcore/distill.py)."""
        from splitcore.distill import load_student

        cache = self._draft_models
        if spec not in cache:
            vocab = self.model.config.vocab_size
            models_dir = str(self.model.path.parent)  # where this model was found: a hub id downloads beside it
            cache[spec] = self.compression.apply(load_student(spec, models_dir, vocab, self.device, self.dtype))
        return cache[spec]

    def draft_source(self, name: str, capacity: int, adapter: str | None = None):
        """The draft source `name` for speculative decoding (splitcore/speculative.py)."""
        if name == "lookup":
            return PromptLookup()
        if name.startswith("draft:"):
            return ModelDraft([self.draft_model(name.removeprefix("draft:"))], capacity, name)
        raise InvalidInput(f"--speculate {name} needs the split client's own parts; here use lookup")

    def new_stepper_checked(
        self,
        ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        notify: Notify | None = None,
        tap: Tap | None = None,
        adapter: str | None = None,
        user: str = "",
    ) -> Stepper:
        check_request(ids, max_new_tokens, self.n_positions, params)  # before opening any remote session
        self.adapter_named(adapter)  # an unknown name fails here, before anything runs
        return self.new_stepper(len(ids) + max_new_tokens, notify, tap, adapter, user)

    def run(
        self,
        prompt: str | list[int],
        max_new_tokens: int,
        params: SamplingParams,
        speculate: str = "none",
        tap: Tap | None = None,
        adapter: str | None = None,
    ) -> GenerationResult:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stats = GenerationStats()
        events = self.stream(ids, max_new_tokens, params, stats, speculate=speculate, tap=tap, adapter=adapter)
        tokens = [e.token_id for e in events]
        return GenerationResult(self.decode(tokens), ids, tokens, stats)


class FullEngine(Engine):
    """The unsplit model: the baseline every split is compared with."""

    def __init__(
        self,
        model: ResolvedModel,
        device: torch.device,
        dtype: torch.dtype,
        attn: str = "sdpa",
        cuda_graphs: bool = False,
        adapter=(),
        compress: str = "none",
    ):
        super().__init__(model, device, dtype, compress)
        logger.info("%s", configure_attention(device))
        self.full = self.compression.apply(load_full(model, device, dtype, attn))
        cuda_graphs = self.compression.graphs_with(cuda_graphs)
        self.adapters = {}  # each: the same model with its LoRA adapter (a twin sharing the (compressed) weights)
        for name, path in parse_adapters(adapter, model.spec).items():
            self.adapters[name] = adapted(self.full, *load_peft(Path(path)), load_client_weights(Path(path)))
        models = [self.full, *self.adapters.values()] if cuda_graphs else []
        self.pools = {id(m): DecoderPool.warmed(m) for m in models}  # decode steps as CUDA graphs

    def new_stepper(
        self,
        max_length: int = 0,
        notify: Notify | None = None,
        tap: Tap | None = None,
        adapter: str | None = None,
        user: str = "",
    ) -> Stepper:
        model = self.adapter_named(adapter) or self.full
        return FullStepper(model, max_length, self.pools.get(id(model)))
