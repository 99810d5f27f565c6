"""The gRPC servicer: decode a request, call the trunk, encode the answer; errors become status codes here.

It runs on the server's asyncio event loop. A session's steps are decoded, queued with the runtime, awaited and
encoded on the loop, with no thread of their own; stateless calls and training steps, whose decoding and
compute are large, run in a worker thread each."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from server.futures import settled
from server.metrics import Metrics
from server.monitor import GpuProbe, Sampler
from server.runtime import TrunkRuntime
from server.sessions import SessionRegistry
from server.status import check_fingerprint, closer, peer, status_on_error
from server.train_servicer import TrainHandler
from splitcomm import codec
from splitcomm.channel import method_handler
from splitcomm.messages import fingerprint_msg, read_adapter_state, settings_from_pb
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.proto import trunk_pb2_grpc as pb_grpc
from splitcore.errors import InvalidInput, LimitExceeded
from splitcore.fingerprint import Fingerprint
from splitcore.lora import adapted, adapter_digest, only_layers
from splitcore.parts import Trunk

logger = logging.getLogger(__name__)


def server_info(cfg, model, split, device: str, dtype, fingerprint: Fingerprint, max_length: int, slots: int,
                version: str) -> pb.ServerInfo:  # fmt: skip
    """What Info answers: the model, its split, where it runs, and the server's limits (`cfg`: a ServerConfig)."""
    c = model.config
    return pb.ServerInfo(
        model=model.spec,
        random_weights=model.is_random,
        n_layer=c.n_layer,
        n_embd=c.n_embd,
        n_head=c.n_head,
        n_positions=c.n_positions,
        split_start=split.s1,
        split_end=split.s2,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        attn=cfg.attn,
        fingerprint=fingerprint_msg(fingerprint),
        version=version,
        limits=pb.Limits(
            max_sessions=cfg.max_sessions,
            max_session_tokens=max_length,
            max_message_bytes=cfg.max_message_bytes,
            idle_timeout_s=cfg.idle_timeout_s,
            kv_slots=slots,
            max_batch=cfg.max_batch,
        ),
    )


class TrunkServicer(pb_grpc.TrunkServicer):
    """Sessions with a server-side KV cache, stateless forward, info and monitoring for one loaded trunk."""

    def __init__(
        self,
        trunk: Trunk,
        info: pb.ServerInfo,
        fingerprint: Fingerprint,
        sessions: SessionRegistry,
        max_elements: int,
        monitor_interval_s: float,
        max_monitors: int,
        runtime: TrunkRuntime,
        train_recompute: bool = False,
        metrics: Metrics | None = None,
        workers: int = 8,
    ):
        self.trunk, self.info, self.fingerprint, self.sessions = trunk, info, fingerprint, sessions
        self.max_length = runtime.max_length  # a session's tokens: --max-session-tokens within the context
        self.max_elements = max_elements
        self.runtime, self.metrics = runtime, metrics  # all compute goes through the runtime, one at a time
        self._count = metrics.error if metrics is not None else None
        self.monitor_interval_s, self.max_monitors = monitor_interval_s, max_monitors
        self.started = time.time()
        self.stopping = threading.Event()
        self._monitors = 0
        self._monitors_lock = threading.Lock()
        self.training = TrainHandler(
            trunk, fingerprint, sessions, runtime.run_timed, max_elements, self.max_length, train_recompute
        )
        self._gpu = GpuProbe(trunk.device.index or 0) if trunk.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")  # stateless and training calls

    @property
    def name(self) -> str:
        """How this replica names itself to clients (its address): in its info and its refusals."""
        return self.training.replica

    @name.setter
    def name(self, value: str) -> None:
        self.training.replica = value

    async def in_thread(self, fn: Callable[..., Any], *args, undo: Callable[[Any], None] | None = None) -> Any:
        """`fn(*args)` in a worker thread, awaited to its end even if the call is cancelled meanwhile (then `undo`
        gets what it returned, and the cancel goes on)."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await settled(fut)
        except asyncio.CancelledError:
            if undo is not None and fut.done() and fut.exception() is None:
                undo(fut.result())
            raise

    # --- Info -------------------------------------------------------------------------------------------
    async def Info(self, request, context):
        info = pb.ServerInfo()
        info.CopyFrom(self.info)
        info.active_sessions = self.sessions.active()
        info.replica = self.name
        return info

    # --- Session ----------------------------------------------------------------------------------------
    async def _open(self, first: pb.StepRequest | None, context) -> object:
        if first is None:
            raise InvalidInput("session stream ended before its first message")
        if first.WhichOneof("kind") != "open":
            raise InvalidInput("the first message of a session must be 'open' with the model fingerprint")
        o = first.open
        weights = read_adapter_state(o.adapter, self.max_elements)[0]
        ours = self.fingerprint.with_adapter(adapter_digest(weights)) if weights else self.fingerprint
        check_fingerprint(ours, o.fingerprint, self.name)
        want = o.max_length or self.max_length
        if want < 0:
            raise InvalidInput(f"max_length must be >= 0, got {want}")
        if want > self.max_length:
            raise LimitExceeded(
                f"session asks for {want} tokens; this server allows at most {self.max_length} "
                f"per session (model context {self.trunk.n_positions}, max session tokens)"
            )
        model = await self._adapted(weights, o.lora) if weights else None
        session = self.sessions.open(peer(context), want, closer())
        try:
            session.slot = self.runtime.acquire_slot()
        except LimitExceeded:
            self.sessions.close(session.id, "refused: no free KV slot")
            raise
        session.model = model
        return session

    async def _adapted(self, weights: dict[str, torch.Tensor], lora: pb.LoraSpec):
        """The trunk with the client's adapter: a twin sharing the base weights, its own LoRA tensors."""
        if only_layers(weights, self.trunk.layers).keys() != weights.keys():
            raise InvalidInput(
                f"adapter tensors for blocks outside the trunk ({self.trunk.layers.start}-"
                f"{self.trunk.layers.stop - 1}): send only the trunk's share"
            )
        settings = settings_from_pb(lora, pb.OptimizerSpec(), 0)
        settings.check(self.trunk.config.n_embd)
        return (await self.runtime.run_timed_async(lambda: adapted(self.trunk, weights, settings)))[0]

    def _release(self, session) -> None:
        """Give the session's slot back with its caches; called by the session's stream handler once the stream
        ends, so nothing of it is queued or running."""
        if session.slot is not None:
            self.runtime.release_slot(session.slot)
        session.slot = session.model = None

    def _check(self, session, req: pb.StepRequest) -> tuple[np.ndarray | torch.Tensor, int] | pb.StepResponse:
        """A step's checks, its rollback if it asks for one, and its hidden states decoded, once: (h, wire dtype),
        or the answer of a step that only rolls back."""
        if req.WhichOneof("kind") != "step":
            raise InvalidInput(f"expected a 'step' message, got '{req.WhichOneof('kind')}'")
        if req.step.step != session.next_step:
            raise InvalidInput(f"step {req.step.step} out of order: expected step {session.next_step}")
        if req.step.HasField("truncate_to"):
            self.runtime.pool.truncate(session.slot, req.step.truncate_to)
            if not req.step.HasField("hidden"):  # a step that only rolls back
                session.next_step += 1
                session.last_active = time.monotonic()
                return pb.StepResponse(step=req.step.step, cache_length=self.runtime.pool.length(session.slot))
        wire = req.step.hidden.dtype
        h = codec.decode_hidden(req.step.hidden, self.max_elements)
        self.trunk.check_hidden_shape(h.shape, wire != pb.INT64, codec.WIRE_NAMES[wire])
        cached = self.runtime.pool.length(session.slot)
        if cached + h.shape[1] > session.max_length:
            raise LimitExceeded(
                f"session would hold {cached + h.shape[1]} tokens, past its limit of "
                f"{session.max_length} (model context / max session tokens)"
            )
        return h, wire

    def _book(self, session, shape, ms: float, rows: int) -> None:
        """A step of `shape` of `session` has run in a forward of `rows` rows that took `ms`: the session's and the
        server's books."""
        session.next_step += 1
        session.last_active = time.monotonic()
        self.sessions.record_steps(1, ms / rows)  # its share of the forward
        if self.metrics is not None:
            self.metrics.step("decode" if shape[1] == 1 else "prefill", shape[0] * shape[1])

    def _answer(self, session, req, shape, wire: int, out, ms: float, rows: int, arrived: float) -> pb.StepResponse:
        """The response to a step that has run, and the session's books."""
        self._book(session, shape, ms, rows)
        resp = pb.StepResponse(
            step=req.step.step,
            hidden=codec.encode(out, codec.wire_torch_dtype(wire)),
            server_ms=ms,
            cache_length=self.runtime.pool.length(session.slot),
        )
        resp.server_wall_ms = (time.perf_counter() - arrived) * 1e3
        if session.next_step == 1:  # its first answer: say which replica holds it
            resp.replica = self.name
        return resp

    async def _step(self, session, req: pb.StepRequest) -> pb.StepResponse:
        arrived = time.perf_counter()
        checked = self._check(session, req)
        if isinstance(checked, pb.StepResponse):
            return checked
        h, wire = checked
        out, ms, rows = await self.runtime.step(session, h)
        return self._answer(session, req, h.shape, wire, out, ms, rows, arrived)

    async def Session(self, request_iterator, context):
        """One session stream: open, then one answer per step, until the client closes it."""
        async with status_on_error(context, "session", self._count):
            session = await self._open(await anext(request_iterator, None), context)
            try:
                async for req in request_iterator:
                    if session.closed:  # by the idle reaper, which marks it and cancels the call
                        break
                    yield await self._step(session, req)
            finally:  # nothing of the session is queued or running now (the runtime's awaits run to the end)
                self.sessions.close(session.id, "ended by the client")
                self._release(session)

    # --- Forward (stateless) ----------------------------------------------------------------------------
    async def Forward(self, request, context):
        async with status_on_error(context, "forward", self._count):
            return await self.in_thread(self._forward, request)

    def _forward(self, request: pb.ForwardRequest) -> pb.ForwardResponse:
        """A stateless call, on a worker thread: its decoding is large (the KV cache comes with it)."""
        arrived = time.perf_counter()
        check_fingerprint(self.fingerprint, request.fingerprint, self.name)
        h = codec.decode(request.hidden, self.max_elements, finite="hidden states")
        kv = None
        if request.kv.dtype:  # read once, into the call's cache: no copy of its own
            kv = codec.decode(request.kv, self.max_elements, finite="the trunk KV cache", copy=False)
        length = (kv.shape[4] if kv is not None and kv.ndim == 6 else 0) + (h.shape[1] if h.ndim == 3 else 0)
        if length > self.max_length:
            raise LimitExceeded(
                f"call would hold {length} tokens, past this server's limit of {self.max_length} "
                f"(model context / max session tokens)"
            )

        def stateless():
            with torch.inference_mode():
                out, new_kv = self.trunk.forward_stateless(h, kv, check_finite=False)
                return out.cpu(), new_kv.cpu()

        with self.sessions.call():
            (out, new_kv), ms = self.runtime.run_timed(stateless)
        self.sessions.record_steps(1, ms)
        if self.metrics is not None:
            self.metrics.step("stateless", h.shape[0] * h.shape[1])
        resp = pb.ForwardResponse(hidden=codec.encode(out, h.dtype), kv=codec.encode(new_kv, h.dtype), server_ms=ms)
        resp.server_wall_ms = (time.perf_counter() - arrived) * 1e3
        return resp

    # --- Train ------------------------------------------------------------------------------------------
    async def Train(self, request_iterator, context):
        async with status_on_error(context, "training session", self._count):
            async for resp in self.training.stream(request_iterator, peer(context), closer(), self.in_thread):
                yield resp

    # --- Monitor ----------------------------------------------------------------------------------------
    async def Monitor(self, request, context):
        async with status_on_error(context, "monitor", self._count):
            interval = min(60.0, max(0.2, request.interval_s or self.monitor_interval_s))
            most = request.max_samples
            with self._monitors_lock:
                if self._monitors >= self.max_monitors:
                    raise LimitExceeded(f"too many monitor streams: the server's limit is {self.max_monitors}")
                self._monitors += 1
        try:
            sampler = Sampler(self._gpu or _NoGpu(), self.started)
            sent = 0
            while not self.stopping.is_set():
                yield pb.MonitorSample(**sampler.sample(self.sessions.counters, self.runtime))
                sent += 1
                if most and sent >= most:
                    return
                deadline = time.monotonic() + interval
                while not self.stopping.is_set() and time.monotonic() < deadline:  # a stop ends it within 0.2 s
                    await asyncio.sleep(min(0.2, deadline - time.monotonic()))
        finally:
            with self._monitors_lock:
                self._monitors -= 1


class Malformed:
    """A request that did not parse: any use of it raises InvalidInput (INVALID_ARGUMENT), inside the handler,
    where status_on_error sends the status (a failed parse in gRPC itself would be INTERNAL)."""

    def __init__(self, kind: str, error: Exception):
        self._why = f"malformed {kind} message: {error}"

    def __getattr__(self, name: str):
        raise InvalidInput(self._why)


def lenient(message_class) -> Callable[[bytes], Any]:
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Malformed(message_class.__name__, e)

    return parse


def add_to_server(servicer: TrunkServicer, server: grpc.aio.Server) -> None:
    """Serve every method of the Trunk service (from the proto's descriptor), with lenient request parsing."""
    service = pb.DESCRIPTOR.services_by_name["Trunk"]
    handlers = {
        m.name: method_handler(m)(
            getattr(servicer, m.name),
            request_deserializer=lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class _NoGpu:
    """Stands in for GpuProbe on a CPU trunk: says so in every sample."""

    def fill(self, s: dict) -> None:
        s["gpu_available"] = False
        s["gpu_status"] = "no GPU: the trunk runs on the CPU"
