"""Build, start and stop the trunk server; `main` is `python -m server`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from frontend.cli import main_guard
from server.config import ServerConfig, parse_config
from server.metrics import Metrics
from server.runtime import TrunkRuntime
from server.servicer import TrunkServicer, add_to_server, server_info
from server.sessions import SessionRegistry
from server.status import DRAINING
from splitcomm.channel import add_port, make_server, new_event_loop
from splitcomm.messages import SERVICE_NAME
from splitcore.compress import Compression
from splitcore.device import (
    configure_attention,
    configure_threads,
    name_os_thread,
    resolve_device,
    resolve_dtype,
    use_cuda_graphs,
)
from splitcore.errors import InvalidInput
from splitcore.fingerprint import model_fingerprint
from splitcore.logs import setup_logging
from splitcore.models import resolve_with_fallback
from splitcore.parts import Split, load_parts
from splitcore.settings import is_loopback

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
SIGNAL_POLL_S = 0.2  # how soon a signal taken by another thread gets handled
DRAIN_POLL_S = 0.05  # how often a draining server looks whether its sessions have ended


def configure_switch_interval(ms: float) -> None:
    """The interpreter's switch interval for this process (0: leave Python's 5 ms). A thread that comes back from a
    call that let go of the GIL (each torch call on a GPU) waits up to this long while the event loop runs."""
    if ms < 0:
        raise InvalidInput(f"--switch-interval-ms must be >= 0, got {ms:g}")
    if ms:
        sys.setswitchinterval(ms / 1e3)
        logger.info("switch interval: %g ms", ms)


class TrunkServer:
    """The trunk blocks behind a gRPC server. start() binds and serves; stop() drains and frees everything."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        device = resolve_device(cfg.device)  # a wrong device fails before any model is fetched or built
        self.compression = Compression.parse(cfg.compress)  # and a bad --compress
        model = resolve_with_fallback(cfg.model, cfg.models_dir, cfg.fallback_random)
        split = Split.parse(cfg.split, model.config.n_layer)
        dtype = resolve_dtype(cfg.dtype, device)
        logger.info("%s", configure_attention(device))
        self.trunk = load_parts(model, split, ("trunk",), device, dtype, cfg.attn)["trunk"]  # trunk weights only
        self.compression.apply(self.trunk)
        self.graphs = self.compression.graphs_with(use_cuda_graphs(cfg.cuda_graphs, device))
        max_length = min(cfg.max_session_tokens or model.config.n_positions, model.config.n_positions)
        slots = self._slots(cfg, max_length)
        self.runtime = TrunkRuntime(
            self.trunk,
            slots,
            max_length,
            cfg.max_batch,
            cfg.batch_wait_ms,
            cfg.prefill_chunk,
            self.graphs,
        )
        logger.info(
            "KV pool: %d slots x %d positions, %.1f MiB each, %.1f MiB in all; decode batches of up to %d, "
            "waiting up to %g ms",
            slots,
            max_length,
            self.runtime.slot_bytes / 2**20,
            self.runtime.pool.cache.nbytes() / 2**20,
            cfg.max_batch,
            cfg.batch_wait_ms,
        )
        self.fingerprint = model_fingerprint(model, split, self.compression)
        self.model, self.split = model, split
        self.sessions = SessionRegistry(cfg.max_sessions, cfg.idle_timeout_s)
        info = server_info(cfg, model, split, f"{device}", dtype, self.fingerprint, max_length, slots, VERSION)
        self.metrics = Metrics(self.runtime, self.sessions) if cfg.metrics_port else None
        self.servicer = TrunkServicer(
            self.trunk,
            info,
            self.fingerprint,
            self.sessions,
            max_elements=cfg.max_message_bytes // 2,
            monitor_interval_s=cfg.monitor_interval_s,
            max_monitors=cfg.max_monitors,
            runtime=self.runtime,
            train_recompute=cfg.train_recompute,
            metrics=self.metrics,
            workers=cfg.max_sessions + 4,  # stateless calls and training steps each hold one while they run
        )
        # gRPC runs on one asyncio event loop in a thread of its own; the runtime's scheduler thread computes.
        self.loop = new_event_loop(cfg.event_loop)
        logger.info("event loop: %s", type(self.loop).__module__.split(".")[0])
        self._loop_thread = threading.Thread(target=self._run_loop, daemon=True, name="grpc-loop")
        self._loop_thread.start()
        self.grpc_server = self._on_loop(self._build())
        self.port: int | None = None
        self._stopped = threading.Event()
        self._done = threading.Event()

    def _run_loop(self) -> None:
        name_os_thread("grpc-loop")
        self.loop.run_forever()

    def _on_loop(self, coro):
        """Run a coroutine on the server's event loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _build(self) -> grpc.aio.Server:
        server = make_server(self.cfg.max_message_bytes, self.cfg.auth_token)
        add_to_server(self.servicer, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    def _slots(self, cfg: ServerConfig, max_length: int) -> int:
        """--kv-slots, or as many as --kv-memory-mb holds."""
        if cfg.kv_memory_mb <= 0:
            return cfg.kv_slots
        per_slot = self.trunk.cache_bytes(max_length + 1)  # the spare position included, as the runtime's
        slots = int(cfg.kv_memory_mb * 2**20 // per_slot)
        if slots < 1:
            raise InvalidInput(
                f"--kv-memory-mb {cfg.kv_memory_mb:g} holds no slot: one takes {per_slot / 2**20:.1f} MiB "
                f"({max_length} positions); raise it or lower --max-session-tokens"
            )
        return slots

    def start(self) -> int:
        host = self.cfg.host
        address = f"[{host}]:{self.cfg.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.cfg.port}"
        self.port = add_port(self.grpc_server, address, self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_client_ca)
        missing = [what for what, have in (("TLS", self.cfg.tls_cert), ("a token", self.cfg.auth_token)) if not have]
        if not is_loopback(host) and missing:
            logger.warning(
                "listening on %s without %s: %s; use --tls-cert/--tls-key and --auth-token beyond a trusted network",
                address,
                " or ".join(missing),
                "hidden states cross the network in the clear" if not self.cfg.tls_cert else "anyone can connect",
            )
        self.servicer.name = replica_name(host, self.port)
        self._on_loop(self.grpc_server.start())
        if self.metrics is not None:
            self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
        for name in ("", SERVICE_NAME):
            self._on_loop(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        logger.info(
            "serving %s blocks %d-%d on %s as replica %s (%s, %s, compression %s, fingerprint %s)",
            self.model.spec,
            self.split.s1,
            self.split.s2 - 1,
            f"{host}:{self.port}",
            self.servicer.name,
            self.trunk.device,
            self.trunk.dtype,
            self.compression,
            self.fingerprint.digest,
        )
        return self.port

    def ready_line(self) -> str:
        weights = " [RANDOM WEIGHTS]" if self.model.is_random else ""
        device = f"{self.trunk.device}" + (" (picked by --device auto)" if self.cfg.device == "auto" else "")
        graphs = ", CUDA graphs" if self.graphs else ""
        graphs += f", {self.runtime.slots} KV slots"
        graphs += f", compressed {self.compression}" if self.compression.active else ""
        return (
            f"trunk server ready on {self.cfg.host}:{self.port}: {self.model.spec}{weights}, blocks "
            f"{self.split.s1}-{self.split.s2 - 1}, {device}, "
            f"{str(self.trunk.dtype).removeprefix('torch.')}{graphs}, fingerprint {self.fingerprint.digest}"
        )

    def stop(self, grace: float | None = None) -> None:
        """Drain, then free everything. Health turns NOT_SERVING and the port closes at once (balancers and clients
        send new sessions elsewhere; one that still arrives is refused with UNAVAILABLE, "draining"); open sessions
        get up to `grace` s to finish; those still open then are ended with UNAVAILABLE, so that their clients
        replay them on another replica."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.sessions.draining = True
        self.servicer.stopping.set()
        self._on_loop(self.health.enter_graceful_shutdown())
        grace = self.cfg.grace_s if grace is None else grace
        open_now = self.sessions.active()
        logger.info("draining: health NOT_SERVING, new sessions refused; %d open get up to %g s", open_now, grace)
        # gRPC stops listening now and tells connected clients to open no new stream here (GOAWAY); the calls
        # in flight go on. Health watches and monitor streams never end by themselves: they are cut below.
        closing = asyncio.run_coroutine_threadsafe(self.grpc_server.stop(grace + 5), self.loop)
        deadline = time.monotonic() + grace
        while self.sessions.active() and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        ended = self.sessions.end_all(f"{DRAINING}: the server's --grace ran out; replay on another replica")
        if ended:
            logger.warning("draining: %d sessions still open after %g s ended with UNAVAILABLE", ended, grace)
        elif open_now:
            logger.info("draining: every open session finished")
        self._on_loop(self.grpc_server.stop(0.5))  # the rest: health watches, monitor streams
        closing.result()
        self.runtime.stop()
        self.servicer.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)
        if self.metrics is not None:
            self.metrics.stop()
        self.sessions.shutdown()
        logger.info("trunk server stopped")
        self._done.set()

    def wait(self) -> None:
        """Until the server has stopped. In slices: the kernel may hand SIGTERM to any thread (gRPC's, torch's),
        and Python runs its handler on the main thread only once that thread runs Python again; a wait without a
        timeout would never return to it."""
        while not self._done.wait(SIGNAL_POLL_S):
            pass


def replica_name(host: str, port: int) -> str:
    """How this replica names itself to clients (in refusals and its info): its address, or with a wildcard bind
    its host's name."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def main(
    argv: list[str] | None = None, server_class: type[TrunkServer] = TrunkServer, cfg: ServerConfig | None = None
) -> None:
    """`python -m server`; `server_class` lets scripts/simulated_server.py run its variant with the same flags;
    `cfg`: flags parsed already (server/__main__.py parses them before torch loads)."""
    cfg = cfg or parse_config(argv)

    def body() -> None:
        setup_logging(cfg.log_file, cfg.verbose)
        configure_threads(cfg.threads)
        configure_switch_interval(cfg.switch_interval_ms)
        server = server_class(cfg)
        server.start()

        heard = []

        def on_signal(signum, frame):
            heard.append(signum)
            if len(heard) == 1:
                with server.sessions.lock():  # no session is admitted after the signal is logged
                    server.sessions.draining = True
                    logger.info("signal %d: shutting down (grace %g s; again to stop at once)", signum, cfg.grace_s)
                threading.Thread(target=server.stop, daemon=True).start()
                return
            logger.warning("signal %d again: stopping at once; sessions in flight are lost", signum)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(128 + signum)  # as a shell reports a process ended by the signal

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(server.ready_line(), flush=True)
        server.wait()
        print("trunk server stopped", flush=True)

    main_guard(body, (OSError, grpc.RpcError))
    sys.exit(0)
