"""Client side of the trunk service: server info, sessions, training sessions, stateless forward, monitor."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from splitcomm.channel import Target, auth_metadata, make_channel, parse_target
from splitcomm.codec import decode, encode
from splitcomm.config import TrunkClientConfig
from splitcomm.errors import TrunkError, TrunkUnavailable, from_rpc_error
from splitcomm.messages import SERVICE_NAME
from splitcomm.proto import trunk_pb2 as pb
from splitcomm.proto import trunk_pb2_grpc as pb_grpc
from splitcore.generate import TrunkReply

logger = logging.getLogger(__name__)

FRAME_OVERHEAD = 17  # per message: gRPC's 5-byte length prefix and the protobuf fields around the tensor's bytes
_END = object()  # closes a session's request stream


@dataclass
class CallTimes:
    """Where one session step's time went, in ms: the profile behind `network_ms`."""

    wall_ms: float  # the whole call as the client saw it
    codec_ms: float  # client side: encode the request, decode the response
    server_wall_ms: float  # server side: request in the handler -> response ready
    server_ms: float  # server side: trunk compute alone

    @property
    def transport_ms(self) -> float:
        """gRPC both ways: serialisation, HTTP/2 framing, sockets and the threads that hand messages on."""
        return max(0.0, self.wall_ms - self.codec_ms - self.server_wall_ms)

    @property
    def server_handling_ms(self) -> float:
        """Server work around the compute: decode, checks, encode."""
        return max(0.0, self.server_wall_ms - self.server_ms)


class _Stream:
    """A bidi stream driven one request, one response at a time, with a watchdog per exchange and RPC errors
    mapped to TrunkError. Sessions and training sessions are each one of these."""

    def __init__(self, method, first, cfg: TrunkClientConfig, what: str):
        self.cfg, self.what = cfg, what
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._q.put(first)  # sent at once; its answer (if any) is read by the first exchange
        self._call = method(iter(self._q.get, _END), metadata=auth_metadata(cfg.token))
        self._started: float | None = None
        self.closed = self._timed_out = False
        if cfg.step_timeout_s > 0:
            threading.Thread(target=self._watchdog, daemon=True, name=f"{what}-watchdog").start()

    def _watchdog(self) -> None:
        while not self.closed:
            started = self._started
            if started is not None and time.monotonic() - started > self.cfg.step_timeout_s:
                self._timed_out = True
                self._call.cancel()
                return
            time.sleep(0.25)

    def exchange(self, req=None):
        """Send `req` (None: only read the answer to what was sent already) and return the response."""
        if self.closed:
            raise TrunkError(f"{self.what} is closed")
        self._started = time.monotonic()
        if req is not None:
            self._q.put(req)
        try:
            return next(self._call)
        except StopIteration:
            raise TrunkUnavailable(f"trunk server at {self.cfg.target} ended the {self.what}") from None
        except grpc.RpcError as e:
            if self._timed_out:
                raise TrunkUnavailable(
                    f"trunk server at {self.cfg.target} did not answer within {self.cfg.step_timeout_s:g} s",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from e
            raise from_rpc_error(e, self.cfg.target) from e
        finally:
            self._started = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._q.put(_END)
            self._call.cancel()  # the server frees what the stream held at once


class TrunkSession:
    """One session: a bidi stream with a KV cache on the server. Use as a context manager or call close()."""

    def __init__(
        self, stub: pb_grpc.TrunkStub, open_msg: pb.SessionOpen, wire_dtype: torch.dtype, cfg: TrunkClientConfig
    ):
        self.cfg, self.wire_dtype = cfg, wire_dtype
        self.steps = 0
        self.last: CallTimes | None = None  # of the latest step
        self.replica = ""  # the server that holds it, as it names itself (with its first answer)
        # the open message goes out with the first step: no extra round trip
        self._stream = _Stream(stub.Session, pb.StepRequest(open=open_msg), cfg, "session")

    def step(self, hidden: torch.Tensor, truncate_to: int | None = None) -> TrunkReply:
        """Send hidden states [1, T, d]; returns (trunk output, server ms, bytes sent, bytes received). With
        `truncate_to`, the server first rolls the session back to that many positions."""
        t0 = time.perf_counter()
        req = pb.StepRequest(
            step=pb.Step(step=self.steps, hidden=encode(hidden, self.wire_dtype), truncate_to=truncate_to)
        )
        t1 = time.perf_counter()
        resp = self._stream.exchange(req)
        t2 = time.perf_counter()
        self.steps += 1
        self.replica = resp.replica or self.replica
        out = decode(resp.hidden)
        t3 = time.perf_counter()
        self.last = CallTimes((t3 - t0) * 1e3, (t1 - t0 + t3 - t2) * 1e3, resp.server_wall_ms, resp.server_ms)
        sent, received = len(req.step.hidden.data), len(resp.hidden.data)  # the tensors' bytes, plus framing
        return TrunkReply(out, resp.server_ms, sent + FRAME_OVERHEAD, received + FRAME_OVERHEAD)

    def truncate(self, length: int) -> int:
        """Roll the session back to `length` positions now (a step of its own); returns what the server holds."""
        resp = self._stream.exchange(pb.StepRequest(step=pb.Step(step=self.steps, truncate_to=length)))
        self.steps += 1
        return resp.cache_length

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> TrunkSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainingSession:
    """One training session: a bidi stream with an adapter and its optimizer on the server."""

    def __init__(self, stub: pb_grpc.TrunkStub, open_msg: pb.TrainOpen, wire_dtype: torch.dtype, cfg):
        self.wire_dtype = wire_dtype
        self._stream = _Stream(stub.Train, pb.TrainRequest(open=open_msg), cfg, "training session")
        self.trainable_parameters = self._stream.exchange().opened.trainable_parameters

    def _call(self, req: pb.TrainRequest, out: pb.Tensor, resp_field: str) -> TrunkReply:
        resp = self._stream.exchange(req)
        got = getattr(resp, resp_field)
        return TrunkReply(decode(got), resp.server_ms, len(out.data) + FRAME_OVERHEAD, len(got.data) + FRAME_OVERHEAD)

    def forward(self, step: int, hidden: torch.Tensor, eval: bool = False) -> TrunkReply:
        t = encode(hidden, self.wire_dtype)
        return self._call(pb.TrainRequest(forward=pb.TrainForward(step=step, hidden=t, eval=eval)), t, "hidden")

    def backward(self, step: int, grad: torch.Tensor) -> TrunkReply:
        t = encode(grad, self.wire_dtype)
        return self._call(pb.TrainRequest(backward=pb.TrainBackward(step=step, grad=t)), t, "grad")

    def export(self) -> pb.AdapterState:
        return self._stream.exchange(pb.TrainRequest(export=pb.TrainExport())).adapter

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrunkClient:
    """A connection to a trunk server, or to several replicas with gRPC's round robin over the healthy ones: each
    call (a session's whole stream) goes to one. Every call has a deadline; RPC errors become TrunkError."""

    def __init__(self, cfg: TrunkClientConfig):
        self.cfg = cfg
        self.target: Target = parse_target(cfg.target)
        self.channel = make_channel(
            self.target,
            cfg.max_message_bytes,
            cfg.tls_ca,
            cfg.tls_cert,
            cfg.tls_key,
            cfg.tls_server_name,
            SERVICE_NAME,
        )
        self.stub = pb_grpc.TrunkStub(self.channel)
        self._metadata = auth_metadata(cfg.token)

    def _unary(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout or None, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.cfg.target) from e

    def info(self, timeout: float | None = None) -> pb.ServerInfo:
        """The server's model, split, limits and fingerprint; fails fast when the server is unreachable."""
        return self._unary(self.stub.Info, pb.InfoRequest(), timeout or self.cfg.connect_timeout_s)

    def training(self, open_msg: pb.TrainOpen, wire_dtype: torch.dtype = torch.float32) -> TrainingSession:
        """Open a training session (waits for the server to accept it)."""
        return TrainingSession(self.stub, open_msg, wire_dtype, self.cfg)

    def session(
        self,
        fingerprint: pb.Fingerprint,
        max_length: int = 0,
        wire_dtype: torch.dtype = torch.float32,
        adapter: tuple[pb.LoraSpec, pb.AdapterState] | None = None,
    ) -> TrunkSession:
        """A session; with `adapter` (its settings and the trunk's share of its weights) the trunk runs it."""
        msg = pb.SessionOpen(fingerprint=fingerprint, max_length=max_length)
        if adapter is not None:
            msg.lora.CopyFrom(adapter[0])
            msg.adapter.CopyFrom(adapter[1])
        return TrunkSession(self.stub, msg, wire_dtype, self.cfg)

    def forward(
        self,
        fingerprint: pb.Fingerprint,
        hidden: torch.Tensor,
        kv: torch.Tensor | None,
        wire_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
        """Stateless call: returns (hidden, KV of the new positions, server ms, bytes sent, bytes received)."""
        req = pb.ForwardRequest(
            fingerprint=fingerprint,
            hidden=encode(hidden, wire_dtype),
            kv=encode(kv, wire_dtype) if kv is not None else pb.Tensor(),
        )
        resp = self._unary(self.stub.Forward, req, self.cfg.step_timeout_s)
        return (
            decode(resp.hidden),
            decode(resp.kv),
            resp.server_ms,
            len(req.hidden.data) + len(req.kv.data) + 2 * FRAME_OVERHEAD,  # counted, not serialised again
            len(resp.hidden.data) + len(resp.kv.data) + 2 * FRAME_OVERHEAD,
        )

    def monitor(self, interval_s: float = 0.0, max_samples: int = 0) -> Iterator[pb.MonitorSample]:
        """Samples as the server sends them; stops when the stream ends. Cancelled when the iterator is closed."""
        call = self.stub.Monitor(
            pb.MonitorRequest(interval_s=interval_s, max_samples=max_samples), metadata=self._metadata
        )
        try:
            yield from call
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(e, self.cfg.target) from e
        finally:
            call.cancel()

    def replicas(self) -> list[TrunkClient]:
        """A client of each replica this one knows by address (one: itself), to monitor each on its own."""
        if len(self.target.replicas) == 1 and not self.target.balanced:
            return [self]
        name = self.cfg.tls_server_name or self.target.authority
        return [
            TrunkClient(dataclasses.replace(self.cfg, target=a, tls_server_name=name)) for a in self.target.replicas
        ]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TrunkClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
