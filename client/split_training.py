"""Split learning on the client: the data, the embeddings, the bottom and the top stay here; the trunk server
trains a LoRA adapter on its blocks from the hidden states and gradients that cross the cut. The gradient of the
trunk's output gives the labels back to a trunk that runs the public top (docs/privacy.md).

SplitTrainer drives a training session over gRPC; LocalTrainer is the reference (the whole model in this
process, plain autograd); `train` runs either over text files with evaluation, checkpoints and resume, and
yields events that the CLI's progress bar and the app's Fine-tune tab show.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from client.config import TrainConfig, check_client_train
from splitcomm.messages import adapter_state, read_adapter_state, train_open
from splitcore.compress import Compression
from splitcore.errors import InvalidInput
from splitcore.gpt2 import hf_layout, with_weights
from splitcore.lora import (
    LoraSettings,
    Optimizer,
    adapter_weights,
    add_lora,
    is_lora,
    load_adapter_weights,
    only_layers,
    save_trained,
    twin,
)
from splitcore.parts import load_full
from splitcore.training import TextData, lm_loss, perplexity

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    step: int
    loss: float
    ms: float  # wall time of the step
    server_ms: float = 0.0  # trunk compute, forward + backward
    bytes_out: int = 0  # this step's bytes to the server
    bytes_in: int = 0
    grad_rms: float = 0.0  # split: the median over positions of the gradient's RMS before --grad-clip / --grad-noise


@dataclass
class TrainEvent:
    """One thing a run did: a step, an evaluation, a checkpoint, the end."""

    kind: str  # "step", "eval", "checkpoint", "stopped", "done"
    step: int
    stats: StepStats | None = None
    eval_loss: float | None = None
    path: str | None = None

    @property
    def perplexity(self) -> float | None:
        return None if self.eval_loss is None else perplexity(self.eval_loss)


def full_weights(*parts) -> dict[str, torch.Tensor]:
    """The trained (non-LoRA) weights of `parts` by HF name, Conv1D layout, the tied head left out ({} when
    only adapters train: nothing is copied then)."""
    return {
        n: hf_layout(n, p)
        for part in parts
        for n, p in part.named_parameters()
        if p.requires_grad and not is_lora(n) and n != "lm_head.weight"
    }


class LocalTrainer:
    """The reference: the whole model in one process, an adapter on the same blocks, one loss.backward().
    With `train_rest`, every weight outside the adapted blocks trains too (the split's `--client-train full`)."""

    def __init__(
        self,
        model,
        layers: list[int],
        settings: LoraSettings,
        resume=None,
        device="cpu",
        dtype=torch.float32,
        train_rest: bool = False,
        compress: list[tuple[Compression, range]] = (),
    ):
        """`compress`: each compression with the blocks it applies to (the split's trunk and client blocks)."""
        weights, moments, steps = resume or ({}, {}, 0)
        full = load_full(model, device, dtype or torch.float32)
        for compression, layers in compress:
            compression.apply(full, layers)
        if train_rest:
            full = with_weights(full, {k: v for k, v in weights.items() if not is_lora(k)})
        self.model = add_lora(full, settings, layers)
        if train_rest:
            adapted = {f"h.{i}." for i in layers}
            for name, p in self.model.named_parameters():
                if not is_lora(name) and not name.startswith(tuple(adapted)):
                    p.requires_grad_(True)
        self.optimizer = Optimizer(self.model, settings)
        if weights:
            load_adapter_weights(self.model, {k: v for k, v in weights.items() if is_lora(k)})
        self.optimizer.load_state(moments, steps)

    def step(self, step: int, ids: torch.Tensor) -> StepStats:
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = lm_loss(self.model(ids.to(self.model.device), all_positions=True), ids.to(self.model.device))
            loss.backward()
        self.optimizer.step()
        return StepStats(step, float(loss.detach()), (time.perf_counter() - t0) * 1e3)

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor) -> float:
        return float(lm_loss(self.model(ids.to(self.model.device), all_positions=True), ids.to(self.model.device)))

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_weights(self.model) | full_weights(self.model)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        return self.adapter(), self.optimizer.state(), self.optimizer.steps

    def close(self) -> None:
        pass


class SplitTrainer:
    """Bottom and top here (frozen, with adapters of their own, or trained in full), the trunk's adapter on the
    server. Trained in full, the bottom's embedding and the top's head stay one tied weight, as in GPT-2."""

    def __init__(
        self,
        engine,
        settings: LoraSettings,
        client_train: str = "none",
        resume=None,
        privacy_weight: float = 0.0,
        adversary_classes: torch.Tensor | None = None,
    ):
        """`privacy_weight` > 0: learned obfuscation (Adversary); `adversary_classes`: the tokens its inverter
        reads among (default: all; the training text's tokens train several times faster)."""
        check_client_train(client_train)
        if privacy_weight < 0 or (privacy_weight > 0 and client_train == "none"):
            raise InvalidInput(
                f"--privacy-weight {privacy_weight}: needs a weight >= 0, and --client-train lora or full for the "
                "client's parts to learn to hide what they send"
            )
        if engine.trunk_client is None:
            raise InvalidInput("split training needs a trunk server (or use --local for the in-process reference)")
        self.engine, self.settings = engine, settings
        weights, moments, steps = resume or ({}, {}, 0)
        trunk_layers = engine.split.layers("trunk", engine.model.config.n_layer)
        theirs = only_layers({k: v for k, v in weights.items() if is_lora(k)}, trunk_layers)
        mine = {k: v for k, v in weights.items() if k not in theirs}
        if client_train == "full":
            self.bottom, self.top = (with_weights(engine.parts[p], mine) for p in ("bottom", "top"))
            self.top.lm_head.weight = self.bottom.wte.weight
            self.bottom.requires_grad_(True), self.top.requires_grad_(True)
        else:
            self.bottom, self.top = twin(engine.parts["bottom"]), twin(engine.parts["top"])
            if client_train == "lora":
                for part in (self.bottom, self.top):
                    add_lora(part, settings)
                    if mine:
                        load_adapter_weights(part, only_layers(mine, part.layers))
        self.client_opt = None if client_train == "none" else Optimizer((self.bottom, self.top), settings)
        if self.client_opt is not None:
            self.client_opt.load_state({k: v for k, v in moments.items() if _base(k) not in theirs}, steps)
        resume = adapter_state(theirs, {k: v for k, v in moments.items() if _base(k) in theirs}, steps)
        open_msg = train_open(engine.fingerprint, settings, resume)
        self.remote = engine.trunk_client.training(open_msg, engine.wire_dtype)
        self.client_trains = self.client_opt is not None
        self.protect = engine.protect or (lambda h, ids: h)  # the defence on what crosses, as in generation
        self.protect_grad = getattr(engine, "protect_grad", None)  # and on the gradient sent back
        self.adversary = None
        if privacy_weight > 0:
            from client.privacy import Adversary

            public = engine.parts["bottom"]  # the adversary's inverter reads against the public embeddings
            self.adversary = Adversary(
                public.wte.weight, public.config.n_embd, privacy_weight, adversary_classes, settings.seed
            )
        self.repair = engine.repair or (lambda out, clean, sent: out)  # and the client's repair of the answer

    def step(self, step: int, ids: torch.Tensor) -> StepStats:
        t0 = time.perf_counter()
        with torch.set_grad_enabled(self.client_trains):
            clean = self.bottom(ids.to(self.bottom.device), all_positions=True)  # (B, T, C)
            h1 = self.protect(clean, ids)  # what is sent
        fwd = self.remote.forward(step, h1.detach())
        h2 = fwd.tensor.to(self.top.device, self.top.dtype).requires_grad_(True)
        with torch.enable_grad():
            top_in = self.repair(h2, clean.detach(), h1.detach())  # h2 + a constant: h2.grad is the trunk's
            # the labels stay here, but the gradient sent for h2 gives them back (client/gradient_attack.py)
            loss = lm_loss(self.top(top_in, all_positions=True), ids.to(self.top.device))
            loss.backward()
        sent = h2.grad  # what the trunk gets back: with --grad-noise, under the client's secret noise
        grad_rms = float(sent[:, :-1].float().pow(2).mean(-1).sqrt().median())  # the last position has no label
        if self.protect_grad is not None:
            sent = self.protect_grad(sent, ids, context="gradient")  # the same window: the same noise, every epoch
        back = self.remote.backward(step, sent)
        if self.client_trains:
            grad = back.tensor.to(h1.device, h1.dtype)
            if self.adversary is not None:
                grad = grad + self.adversary.push(h1.detach(), ids)  # and away from what its inverter reads
            h1.backward(grad)
            self.client_opt.step()
            if self.adversary is not None:
                self.adversary.learn(h1.detach(), ids)
        return StepStats(
            step,
            float(loss.detach()),
            (time.perf_counter() - t0) * 1e3,
            fwd.server_ms + back.server_ms,
            fwd.bytes_out + back.bytes_out,
            fwd.bytes_in + back.bytes_in,
            grad_rms,
        )

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor) -> float:
        clean = self.bottom(ids.to(self.bottom.device), all_positions=True)
        sent = self.protect(clean, ids)
        h = self.remote.forward(0, sent, eval=True).tensor.to(self.top.device, self.top.dtype)
        return float(lm_loss(self.top(self.repair(h, clean, sent), all_positions=True), ids))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        weights, moments, steps = read_adapter_state(self.remote.export())
        if self.client_opt is not None:
            weights |= adapter_weights(self.bottom) | adapter_weights(self.top) | full_weights(self.bottom, self.top)
            moments |= self.client_opt.state()
        return weights, moments, steps

    def adapter(self) -> dict[str, torch.Tensor]:
        return self.state()[0]

    def close(self) -> None:
        self.remote.close()


def _base(moment_name: str) -> str:
    return moment_name.rsplit(".", 1)[0]


# --- checkpoints ------------------------------------------------------------------------------------------
@dataclass
class RunLog:
    """What a run measured, saved with every checkpoint and at the end (training_log.json)."""

    config: dict = field(default_factory=dict)
    losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    evals: list[list[float]] = field(default_factory=list)  # [step, held-out loss]
    seconds: float = 0.0


def save_checkpoint(out: Path, step: int, trainer, settings: LoraSettings, base: str, log: RunLog) -> Path:
    from safetensors.torch import save_file

    weights, moments, opt_steps = trainer.state()
    path = out / f"checkpoint-{step}"
    save_trained(path, weights, settings, base)
    save_file({k: v.contiguous().cpu() for k, v in moments.items()}, str(path / "optimizer.safetensors"))
    (path / "trainer_state.json").write_text(
        json.dumps({"step": step, "optimizer_steps": opt_steps} | asdict(log), indent=1)
    )
    return path


def latest_checkpoint(out: Path) -> Path | None:
    found = [p for p in out.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return max(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def load_checkpoint(path: Path):
    from safetensors.torch import load_file

    from splitcore.lora import load_client_weights, load_peft

    weights = load_peft(path)[0] | load_client_weights(path)
    moments = load_file(str(path / "optimizer.safetensors"))
    state = json.loads((path / "trainer_state.json").read_text())
    log = RunLog(state["config"], state["losses"], state["evals"], state["seconds"])
    return weights, moments, state["optimizer_steps"], state["step"], log


# --- the loop ---------------------------------------------------------------------------------------------
class Run:
    """Steps start+1..cfg.steps of a trainer over `data`, evaluating on the held-out part and checkpointing every
    cfg.eval_every steps; iterate it for TrainEvents. `stop()` (Ctrl-C, the app's Stop button) ends it after the
    step in progress, with a checkpoint to resume from."""

    def __init__(self, trainer, data: TextData, cfg: TrainConfig, base: str, start: int = 0, log: RunLog | None = None):
        self.trainer, self.data, self.cfg, self.base = trainer, data, cfg, base
        self.log = log or RunLog(asdict(cfg))
        self.last_step, self.out, self.settings = start, Path(cfg.out), cfg.lora()
        self._eval = data.eval_batches(cfg.batch_size, cfg.eval_batches)
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def evaluate(self) -> float:
        losses = [self.trainer.eval_loss(b) for b in self._eval]
        return sum(losses) / len(losses)

    def checkpoint(self) -> Path:
        return save_checkpoint(self.out, self.last_step, self.trainer, self.settings, self.base, self.log)

    def __iter__(self) -> Iterator[TrainEvent]:
        if self.last_step == 0:
            loss = self.evaluate()
            self.log.evals.append([0, loss])
            yield TrainEvent("eval", 0, eval_loss=loss)
        started = time.perf_counter() - self.log.seconds
        for step in range(self.last_step + 1, self.cfg.steps + 1):
            if self._stop:
                yield TrainEvent("stopped", self.last_step, path=str(self.checkpoint()))
                return
            stats = self.trainer.step(step, self.data.batch(step, self.cfg.batch_size, self.cfg.seed))
            self.last_step = step
            self.log.losses.append([step, stats.loss])
            self.log.seconds = time.perf_counter() - started
            yield TrainEvent("step", step, stats=stats)
            if step == self.cfg.steps or (self.cfg.eval_every and step % self.cfg.eval_every == 0):
                loss = self.evaluate()
                self.log.evals.append([step, loss])
                yield TrainEvent("eval", step, eval_loss=loss)
                yield TrainEvent("checkpoint", step, path=str(self.checkpoint()))
        weights = self.trainer.adapter()
        save_trained(self.out, weights, self.settings, self.base)
        (self.out / "training_log.json").write_text(json.dumps(asdict(self.log), indent=1))
        yield TrainEvent("done", self.last_step, path=str(self.out))
