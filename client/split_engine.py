"""The split engine: bottom and top in this process, the trunk in-process or on a server (session/stateless)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.config import ClientConfig
from splitcomm import messages
from splitcomm.codec import parse_wire_dtype
from splitcomm.errors import TrunkError
from splitcomm.links import DelayedLink, SessionLink, StatelessLink
from splitcomm.messages import adapter_state, fingerprint_msg, lora_spec
from splitcomm.trunk_client import TrunkClient
from splitcore.compress import Compression
from splitcore.cudagraph import DecoderPool
from splitcore.defence import Defence
from splitcore.device import configure_attention, resolve_device, resolve_dtype, use_cuda_graphs
from splitcore.engine import Engine, Notify, Tap
from splitcore.errors import InvalidInput, Mismatch
from splitcore.fingerprint import model_fingerprint
from splitcore.generate import LocalTrunkLink, SplitStepper, Stepper
from splitcore.lora import adapted, adapter_digest, adapter_layers, load_client_weights, load_peft, only_layers
from splitcore.models import resolve_with_fallback
from splitcore.parts import Split, load_parts
from splitcore.settings import parse_adapters
from splitcore.speculative import ModelDraft

logger = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """A LoRA adapter loaded for generation (a record; `adapted()` gives the model): the client's parts with it,
    and the trunk's share to upload."""

    layers: list[int]  # blocks it adapts
    parts: dict  # the client's parts (and an in-process trunk) running it
    pools: dict  # their CUDA-graph pools, if any
    trunk_open: tuple[messages.LoraSpec, messages.AdapterState] | None  # a session opens with it; None: no adapter
    session_fingerprint: messages.FingerprintMsg | None  # the base fingerprint plus the trunk share's digest


class SplitEngine(Engine):
    """Tokeniser, bottom and top here; the trunk where the config says."""

    def __init__(self, cfg: ClientConfig, notify: Callable[[str], None] | None = None):
        device = resolve_device(cfg.device)  # a wrong device fails before any model is fetched or built
        model = resolve_with_fallback(cfg.model, cfg.models_dir, cfg.fallback_random)
        super().__init__(model, device, resolve_dtype(cfg.dtype, device), cfg.compress)
        trunk_compression = Compression.parse(cfg.compress if cfg.trunk_compress is None else cfg.trunk_compress)
        self.cfg = cfg
        self.split = Split.parse(cfg.split, model.config.n_layer)
        noise = cfg.noise()  # a bad defence fails before anything is loaded or reached
        if cfg.privacy_meter and not cfg.attack_data:
            raise InvalidInput("--privacy-meter needs public text to train its attacker on: give --attack-data")
        if cfg.attack_steps < 1:
            raise InvalidInput(f"--attack-steps must be at least 1, got {cfg.attack_steps}")
        if cfg.attack_candidates < 0:
            raise InvalidInput(f"--attack-candidates must be >= 0 (0: every token), got {cfg.attack_candidates}")
        self.defence = Defence.build(
            noise, cfg.grad_noise_defence(), cfg.denoise, cfg.defence_seed, model.config.n_embd, device
        )
        self.wire_dtype = parse_wire_dtype(cfg.wire_dtype)
        parts = ("bottom", "trunk", "top") if cfg.local_trunk else ("bottom", "top")
        logger.info("%s", configure_attention(device))
        self.parts = load_parts(model, self.split, parts, device, self.dtype, cfg.attn)
        for name, part in self.parts.items():
            (trunk_compression if name == "trunk" else self.compression).apply(part)
        graphs = trunk_compression.graphs_with(self.compression.graphs_with(use_cuda_graphs(cfg.cuda_graphs, device)))
        self.pools = {name: DecoderPool.warmed(part) for name, part in self.parts.items()} if graphs else {}
        fp = model_fingerprint(model, self.split, trunk_compression)
        self.fingerprint = fingerprint_msg(fp)  # the base model's
        self._base_fp, self._graphs = fp, graphs
        self.adapters = {
            name: self.load_adapter(path) for name, path in parse_adapters(cfg.adapter, model.spec).items()
        }
        self.trunk_client = None if cfg.local_trunk else TrunkClient(cfg.trunk_client_config())
        self.notify = notify or (lambda msg: logger.warning("%s", msg))

    @property
    def adapter(self) -> LoadedAdapter | None:
        """The default adapter (the first --adapter), or None."""
        return self.adapter_named(None)

    def add_adapter(self, name: str, path: str) -> None:
        """Load the adapter in `path` as `name` (the Fine-tune tab, when a run ends); a generation runs it when it
        names it."""
        self.adapters[name] = self.load_adapter(path)

    def load_adapter(self, path: str) -> LoadedAdapter:
        """The adapter in `path` on this engine's parts (and what a session uploads of it), without generating
        with it."""
        weights, settings = load_peft(Path(path))
        client = load_client_weights(Path(path))  # the client's own weights, if the run trained them in full
        n_layer = self.model.config.n_layer
        layers = sorted(adapter_layers(weights))
        if not layers or layers[-1] >= n_layer:
            raise InvalidInput(f"adapter {path} adapts blocks {layers}; this model has blocks 0-{n_layer - 1}")
        parts = {name: adapted(part, weights, settings, client) for name, part in self.parts.items()}
        pools = {name: DecoderPool.warmed(part) for name, part in parts.items()} if self._graphs else {}
        share = only_layers(weights, self.split.layers("trunk", n_layer))
        trunk_open = fp = None
        if share and not self.cfg.local_trunk:
            lora = lora_spec(dataclasses.replace(settings, dropout=0.0))  # a served adapter runs without dropout
            trunk_open = (lora, adapter_state(share))
            fp = fingerprint_msg(self._base_fp.with_adapter(adapter_digest(share)))
        logger.info(
            "adapter %s: LoRA rank %d on blocks %s%s",
            path,
            settings.rank,
            layers,
            f", the client's weights trained in full ({len(client)} tensors)" if client else "",
        )
        return LoadedAdapter(layers, parts, pools, trunk_open, fp)

    @property
    def trunk_label(self) -> str:
        defence = f", defence {self.noise.label()}" if self.noise.active else ""
        if self.cfg.local_trunk:
            return f"in-process trunk{defence}"
        mode = "stateless" if self.cfg.stateless else "session"
        return f"{self.cfg.server} ({mode}, {self.cfg.wire_dtype} wire{defence})"

    def server_info(self) -> messages.ServerInfo:
        """The server's info; raises TrunkUnavailable within the connect timeout when it can't be reached."""
        if self.trunk_client is None:
            raise TrunkError("this client runs its trunk in-process: there is no server")
        return self.trunk_client.info()

    def check_server(self) -> messages.ServerInfo:
        """Fail early, in one readable line, when the server is unreachable or serves another model."""
        info = self.server_info()
        if info.fingerprint.digest != self.fingerprint.digest:
            ours, theirs = self.fingerprint.compression, info.fingerprint.compression
            hint = "" if ours == theirs else ", and this client's --trunk-compress as the server's --compress"
            ours = f"{self.model.spec} split {self.split}" + (f" (trunk compressed {ours})" if ours else "")
            theirs = f"{info.model} split {info.split_start},{info.split_end}" + (
                f" compressed {theirs}" if theirs else ""
            )
            raise Mismatch(
                f"trunk server at {self.cfg.server} serves {theirs}, this client has {ours}; "
                f"start both with the same --model and --split{hint}"
            )
        return info

    def new_stepper(
        self,
        max_length: int = 0,
        notify: Notify | None = None,
        tap: Tap | None = None,
        adapter: str | None = None,
        user: str = "",
    ) -> Stepper:
        a = self.adapter_named(adapter)
        parts, pools = (a.parts, a.pools) if a else (self.parts, self.pools)
        if self.trunk_client is None:
            link = LocalTrunkLink(parts["trunk"], max_length, pools.get("trunk"))
        elif self.cfg.stateless:
            if a and a.trunk_open:
                raise InvalidInput("the stateless mode does not carry an adapter: generate in a session instead")
            link = StatelessLink(self.trunk_client, self.fingerprint, self.wire_dtype, max_length)
        else:
            link = SessionLink(
                self.trunk_client,
                a.session_fingerprint if a and a.trunk_open else self.fingerprint,
                max_length,
                self.wire_dtype,
                self.cfg.reconnect_s,
                self._notify_both(notify),
                a.trunk_open if a else None,
            )
        if self.cfg.added_delay_ms > 0:
            link = DelayedLink(link, self.cfg.added_delay_ms)
        context = (adapter or "") + (f"\x00user {user}" if user else "")  # keys the noise (Protect.stream)
        bottom, top = parts["bottom"], parts["top"]
        return SplitStepper(bottom, top, link, max_length, pools, self.protect, context, tap, self.repair)

    draft_sources = ("none", "lookup", "self")

    def draft_source(self, name: str, capacity: int, adapter: str | None = None):
        """Prompt lookup, or the client's own bottom and top without the trunk (with the generation's adapter)."""
        if name != "self":
            return super().draft_source(name, capacity, adapter)
        a = self.adapter_named(adapter)
        parts = a.parts if a is not None else self.parts
        return ModelDraft([parts["bottom"], parts["top"]], capacity, "self")

    def _notify_both(self, notify: Notify | None) -> Notify:
        """The engine's listener (a log line by default) and this generation's."""

        def both(msg: str) -> None:
            self.notify(msg)
            if notify is not None:
                notify(msg)

        return both

    # the defence's parts, by the names the steppers, trainers and attacks read (one object holds them)
    @property
    def noise(self):
        return self.defence.noise

    @property
    def protect(self):
        return self.defence.protect

    @property
    def protect_grad(self):
        return self.defence.protect_grad

    @property
    def repair(self):
        return self.defence.repair

    def close(self) -> None:
        if self.trunk_client is not None:
            self.trunk_client.close()

    def __enter__(self) -> SplitEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
