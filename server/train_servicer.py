"""Training sessions of the trunk server: a Train stream's messages decoded, run on the session's PartTrainer
(a LoRA adapter on a twin of the trunk that shares its frozen weights), and encoded. The base weights never
change; each session's adapter, optimizer and saved activations are freed when its stream ends."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from server.sessions import Session, SessionRegistry
from server.status import check_fingerprint
from splitcomm import codec
from splitcomm.messages import adapter_state, read_adapter_state, settings_from_pb
from splitcomm.proto import trunk_pb2 as pb
from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.fingerprint import Fingerprint
from splitcore.lora import adapter_weights, add_lora, load_adapter_weights, twin
from splitcore.parts import Trunk
from splitcore.training import PartTrainer

logger = logging.getLogger(__name__)


def _cpu(t):
    return None if t is None else t.cpu()


class TrainHandler:
    """The Train RPC: one stream, one training session, counted with the inference sessions."""

    def __init__(
        self,
        trunk: Trunk,
        fingerprint: Fingerprint,
        sessions: SessionRegistry,
        run: Callable[[Callable[[], Any]], tuple[Any, float]],
        max_elements: int,
        max_length: int,
        recompute: bool = False,
    ):
        self.trunk, self.fingerprint, self.sessions = trunk, fingerprint, sessions
        self.run = run  # runs a callable through the trunk runtime, one at a time: (result, compute ms)
        self.max_elements, self.max_length, self.recompute = max_elements, max_length, recompute
        self.replica = ""  # the server's name for itself, in refusals (set once it listens)
        self.live: weakref.WeakValueDictionary[str, PartTrainer] = weakref.WeakValueDictionary()  # for tests

    def _open(self, first: pb.TrainRequest | None, peer: str, cancel) -> tuple[Session, PartTrainer]:
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidInput("the first message of a training session must be 'open' with the model fingerprint")
        o = first.open
        check_fingerprint(self.fingerprint, o.fingerprint, self.replica)
        settings = settings_from_pb(o.lora, o.optimizer, o.seed)
        settings.check(self.trunk.config.n_embd)
        weights, moments, steps = read_adapter_state(o.resume, self.max_elements)
        session = self.sessions.open(peer, self.max_length, cancel)
        try:

            def build() -> PartTrainer:
                trainer = PartTrainer(add_lora(twin(self.trunk), settings), settings, self.recompute)
                if weights:
                    load_adapter_weights(trainer.part, weights)
                trainer.optimizer.load_state(moments, steps)
                return trainer

            trainer = self.run(build)[0]
        except Exception:
            self.sessions.close(session.id, "refused")
            raise
        self.live[session.id] = trainer
        logger.info(
            "training session %s: LoRA rank %d on %s, lr %g%s",
            session.id,
            settings.rank,
            ",".join(settings.targets),
            settings.lr,
            f", resumed at step {steps}" if weights else "",
        )
        return session, trainer

    def _forward(self, trainer: PartTrainer, msg: pb.TrainForward) -> pb.TrainResponse:
        h = codec.decode(msg.hidden, self.max_elements, finite="hidden states")
        self.trunk.check_hidden(h, check_finite=False)
        if h.shape[1] > self.max_length:
            raise LimitExceeded(f"batch of {h.shape[1]} tokens a row is past this server's limit of {self.max_length}")
        out, ms = self.run(lambda: trainer.forward(msg.step, h, msg.eval).cpu())
        return pb.TrainResponse(step=msg.step, hidden=codec.encode(out, h.dtype), server_ms=ms)

    def _backward(self, trainer: PartTrainer, msg: pb.TrainBackward) -> pb.TrainResponse:
        g = codec.decode(msg.grad, self.max_elements)  # NaN/inf: checked by the trainer, which names it
        grad, ms = self.run(lambda: _cpu(trainer.backward(msg.step, g)))
        return pb.TrainResponse(step=msg.step, grad=codec.encode(grad, g.dtype), server_ms=ms)

    def _export(self, trainer: PartTrainer) -> pb.TrainResponse:
        opt = trainer.optimizer
        return pb.TrainResponse(adapter=adapter_state(adapter_weights(trainer.part), opt.state(), opt.steps))

    def _close(self, opened: tuple[Session, PartTrainer]) -> None:
        session, trainer = opened
        self.sessions.close(session.id)
        trainer.drop_pending()

    async def stream(self, request_iterator, peer: str, cancel, in_thread):
        """The training stream, on the server's event loop; each message is handled on a worker thread
        (`in_thread`), which is awaited to its end, so the session's state is never dropped under it."""
        first = await anext(request_iterator, None)
        opened = await in_thread(self._open, first, peer, cancel, undo=self._close)
        session, trainer = opened
        try:
            yield pb.TrainResponse(
                opened=pb.TrainOpened(
                    trainable_parameters=sum(p.numel() for p in trainer.part.parameters() if p.requires_grad)
                )
            )
            async for req in request_iterator:
                if session.closed:  # by the idle reaper
                    break
                kind = req.WhichOneof("kind")
                if kind == "forward":
                    yield await in_thread(self._forward, trainer, req.forward)
                elif kind == "backward":
                    yield await in_thread(self._backward, trainer, req.backward)
                elif kind == "export":
                    yield await in_thread(self._export, trainer)
                else:
                    raise InvalidInput(f"expected forward, backward or export in a training session, got '{kind}'")
                session.last_active = time.monotonic()
                session.next_step += 1
        finally:
            self._close(opened)
            del trainer, opened  # the adapter, its optimizer and any saved activations go with the last reference
