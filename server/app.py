"""Build, start and stop the trunk server; `main` is `python -m server`."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.config import ServerConfig, parse_config
from server.front import READY
from server.metrics import Metrics
from server.relay import RELAY_SERVICE, RelayServicer
from server.runtime import TrunkRuntime
from server.servicer import TrunkServicer, add_to_server, lenient
from server.sessions import SessionRegistry
from splitcomm.channel import add_port, make_server, new_event_loop
from splitcomm.proto import trunk_pb2 as pb
from splitcore.cli import main_guard
from splitcore.errors import InvalidInput
from splitcore.fingerprint import model_fingerprint
from splitcore.logs import setup_logging
from splitcore.models import resolve_with_fallback
from splitcore.parts import Split, load_parts
from splitcore.runtime import (
    configure_attention,
    configure_threads,
    name_os_thread,
    resolve_device,
    resolve_dtype,
    use_cuda_graphs,
)

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
SIGNAL_POLL_S = 0.2  # how soon a signal taken by another thread gets handled
RESTART_AFTER_S = 5.0  # a gRPC front that exits is started again if it had served this long


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
        if cfg.fronts < 0:
            raise InvalidInput(f"--fronts must be >= 0 (0: this process serves gRPC itself), got {cfg.fronts}")
        device = resolve_device(cfg.device)  # a wrong device fails before any model is fetched or built
        model = resolve_with_fallback(cfg.model, cfg.models_dir, cfg.fallback_random)
        split = Split.parse(cfg.split, model.config.n_layer)
        dtype = resolve_dtype(cfg.dtype, device)
        logger.info("%s", configure_attention(device))
        self.trunk = load_parts(model, split, ("trunk",), device, dtype, cfg.attn)["trunk"]  # trunk weights only
        self.graphs = use_cuda_graphs(cfg.cuda_graphs, device)
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
            cfg.pipeline_depth,
        )
        logger.info(
            "KV pool: %d slots x %d positions, %.1f MiB each, %.1f MiB in all; decode batches of up to %d, "
            "waiting up to %g ms, %d in flight",
            slots,
            max_length,
            self.runtime.slot_bytes / 2**20,
            self.runtime.cache.nbytes() / 2**20,
            cfg.max_batch,
            cfg.batch_wait_ms,
            cfg.pipeline_depth,
        )
        self.fingerprint = model_fingerprint(model, split)
        self.model, self.split = model, split
        self.sessions = SessionRegistry(cfg.max_sessions, cfg.idle_timeout_s)
        fp = pb.Fingerprint(**self.fingerprint.to_dict(), digest=self.fingerprint.digest)
        c = model.config
        info = pb.ServerInfo(
            model=model.spec,
            random_weights=model.is_random,
            n_layer=c.n_layer,
            n_embd=c.n_embd,
            n_head=c.n_head,
            n_positions=c.n_positions,
            split_start=split.s1,
            split_end=split.s2,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attn=cfg.attn,
            fingerprint=fp,
            version=VERSION,
            limits=pb.Limits(
                max_sessions=cfg.max_sessions,
                max_session_tokens=min(cfg.max_session_tokens or c.n_positions, c.n_positions),
                max_message_bytes=cfg.max_message_bytes,
                idle_timeout_s=cfg.idle_timeout_s,
                kv_slots=slots,
                max_batch=cfg.max_batch,
            ),
        )
        self.metrics = Metrics(self.runtime, self.sessions) if cfg.metrics_port else None
        self.relay = None  # with --fronts: the engine's end of their relay (built with the gRPC server)
        self.servicer = TrunkServicer(
            self.trunk,
            info,
            self.fingerprint,
            self.sessions,
            cfg.max_session_tokens,
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
        if self.metrics is not None and self.relay is not None:
            self.metrics.relay(self.relay.stats)
        self.fronts: list[subprocess.Popen] = []  # with --fronts: the processes that serve the port
        self._fronts_lock = threading.Lock()
        self._fronts_stopping = False
        self._engine_dir: str | None = None  # and the private directory of this process's own socket
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
        if self.cfg.fronts:  # on a private socket, to its fronts only: they check the token and the message sizes
            server = make_server(max_message_bytes=-1)  # a relay batch carries many messages
        else:
            server = make_server(self.cfg.max_message_bytes, self.cfg.auth_token)
        add_to_server(self.servicer, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.cfg.fronts:
            self.relay = relay = RelayServicer(self.servicer, lenient(pb.StepRequest))
            handler = grpc.stream_stream_rpc_method_handler(
                relay.Relay,
                request_deserializer=pb.RelayBatch.FromString,
                response_serializer=pb.RelayBatch.SerializeToString,
            )
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RELAY_SERVICE, {"Relay": handler}),))
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
        if self.cfg.fronts:  # this process serves only its fronts, on a socket in a directory of its own
            self._engine_dir = tempfile.mkdtemp(prefix="gpt2split-engine-")
            add_port(self.grpc_server, f"unix:{self._engine_dir}/engine.sock")
        else:
            self.port = add_port(self.grpc_server, address, self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_client_ca)
        if host not in LOOPBACK and not self.cfg.tls_cert:
            logger.warning(
                "listening on %s without TLS: hidden states cross the network in the clear; "
                "use --tls-cert/--tls-key (and --auth-token) on an untrusted network",
                address,
            )
        self._on_loop(self.grpc_server.start())
        if self.cfg.fronts:
            self.port = self._start_fronts(host, self.cfg.port)
        if self.metrics is not None:
            self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
        for name in ("", SERVICE_NAME):
            self._on_loop(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        logger.info(
            "serving %s blocks %d-%d on %s (%s, %s, fingerprint %s)",
            self.model.spec,
            self.split.s1,
            self.split.s2 - 1,
            f"{host}:{self.port}",
            self.trunk.device,
            self.trunk.dtype,
            self.fingerprint.digest,
        )
        return self.port

    def _start_fronts(self, host: str, port: int) -> int:
        """Start --fronts processes on `port` (0: a free one), each relaying to this one; returns the port. If one
        cannot start, the others stop and the socket's directory goes."""
        try:
            return self._spawn_fronts(host, _claim(host, port))
        except BaseException:
            self._stop_fronts(0)
            raise

    def _spawn_fronts(self, host: str, port: int) -> int:
        cfg = self.cfg
        env = dict(os.environ)
        env.pop("GPT2_AUTH_TOKEN", None)
        if cfg.auth_token:  # in the environment, not on a command line that `ps` shows
            env["GPT2_AUTH_TOKEN"] = cfg.auth_token
        args = ["--engine", f"unix:{self._engine_dir}/engine.sock", "--host", host, "--port", str(port)]
        args += ["--max-message-bytes", str(cfg.max_message_bytes), "--event-loop", cfg.event_loop]
        args += ["--grace", str(cfg.grace_s)] + (["--log-file", cfg.log_file] if cfg.log_file else [])
        for flag, value in (
            ("--tls-cert", cfg.tls_cert),
            ("--tls-key", cfg.tls_key),
            ("--tls-client-ca", cfg.tls_client_ca),
        ):
            if value:
                args += [flag, value]
        self._front_cmd, self._front_env = [sys.executable, "-m", "server.front", *args], env
        self.fronts = [self._front(i) for i in range(cfg.fronts)]  # all start at once
        for i, p in enumerate(self.fronts):
            self._ready(i, p)
        logger.info("%d gRPC fronts serving port %d (pids %s)", len(self.fronts), port, [p.pid for p in self.fronts])
        return port

    def _front(self, i: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*self._front_cmd, "--name", f"front-{i}"],
            stdin=subprocess.PIPE,  # it ends when this process does, and so does the front
            stdout=subprocess.PIPE,
            text=True,
            env=self._front_env,
            process_group=0,  # a terminal's Ctrl-C reaches this process alone, which stops the fronts in order
        )

    def _ready(self, i: int, p: subprocess.Popen) -> None:
        """Wait for front i's ready line (nothing if it failed: it said why on stderr), then watch it."""
        if not p.stdout.readline().startswith(READY):
            raise OSError(f"gRPC front {i} did not start (exit code {p.wait()}): see the error above")
        threading.Thread(target=self._watch, args=(i, p), daemon=True, name=f"front-{i}-watch").start()

    def _watch(self, i: int, p: subprocess.Popen) -> None:
        """A front that exits while the server runs is started again (its sessions have ended: the engine freed
        their slots, and their clients reconnect and replay), unless it lived less than RESTART_AFTER_S."""
        started = time.monotonic()
        code = p.wait()
        if self._fronts_stopping:
            return
        lived = time.monotonic() - started
        if lived < RESTART_AFTER_S:
            logger.error(
                "gRPC front %d (pid %d) exited with code %s after %.1f s; not restarted (it would only "
                "exit again); the others serve on",
                i,
                p.pid,
                code,
                lived,
            )
            return
        logger.error(
            "gRPC front %d (pid %d) exited with code %s; its sessions ended; starting it again", i, p.pid, code
        )
        with self._fronts_lock:
            if self._fronts_stopping:
                return
            again = self._front(i)
            self.fronts[i] = again
        try:
            self._ready(i, again)
            logger.info("gRPC front %d serving again (pid %d)", i, again.pid)
        except (OSError, ValueError) as e:  # ValueError: the server stopped meanwhile and closed its pipe
            logger.error("gRPC front %d not started again: %s", i, e)

    def _stop_fronts(self, grace: float | None) -> None:
        """Tell every front to stop, wait for them (calls in flight get `grace` s; None: killed at once), and remove
        the socket."""
        with self._fronts_lock:  # and none is started again (_watch)
            self._fronts_stopping = True
        for p in self.fronts:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if grace is not None else signal.SIGKILL)
        for p in self.fronts:
            try:
                p.wait(None if grace is None else grace + 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stdout.close()
        if self._engine_dir:
            shutil.rmtree(self._engine_dir, ignore_errors=True)

    def ready_line(self) -> str:
        weights = " [RANDOM WEIGHTS]" if self.model.is_random else ""
        device = f"{self.trunk.device}" + (" (picked by --device auto)" if self.cfg.device == "auto" else "")
        graphs = ", CUDA graphs" if self.graphs else ""
        graphs += f", {self.runtime.slots} KV slots"
        n = len(self.fronts)
        graphs += f", {n} gRPC front" + "s" * (n > 1) if n else ""
        return (
            f"trunk server ready on {self.cfg.host}:{self.port}: {self.model.spec}{weights}, blocks "
            f"{self.split.s1}-{self.split.s2 - 1}, {device}, "
            f"{str(self.trunk.dtype).removeprefix('torch.')}{graphs}, fingerprint {self.fingerprint.digest}"
        )

    def stop(self, grace: float | None = None) -> None:
        """Refuse new sessions, let in-flight steps finish (up to `grace` s), then free every session."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.sessions.draining = True
        self.servicer.stopping.set()
        self._on_loop(self.health.enter_graceful_shutdown())
        grace = self.cfg.grace_s if grace is None else grace
        self._stop_fronts(grace)  # they drain first: their sessions run on this process
        self._on_loop(self.grpc_server.stop(grace))
        self.runtime.stop()
        self.servicer.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)
        if self.metrics is not None:
            self.metrics.stop()
        self.sessions.shutdown()
        logger.info("trunk server stopped")
        self._done.set()

    def abort(self) -> None:
        """For a stop at once (a second signal, while `stop` drains): the fronts are killed and the socket's
        directory goes; the caller then exits the process, which ends every session."""
        self._stop_fronts(None)

    def wait(self) -> None:
        """Until the server has stopped. In slices: the kernel may hand SIGTERM to any thread (gRPC's, torch's),
        and Python runs its handler on the main thread only once that thread runs Python again; a wait without a
        timeout would never return to it."""
        while not self._done.wait(SIGNAL_POLL_S):
            pass


def _claim(host: str, port: int) -> int:
    """`port` (0: a free one) if nothing listens on it: fronts share their port, so they would share it with
    anything else that does too; checked here with a plain bind, which fails on a port in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            raise OSError(
                f"cannot bind {host}:{port}: the port is in use or the address is not on this machine"
            ) from None
        return s.getsockname()[1]


def main(argv: list[str] | None = None, server_class: type[TrunkServer] = TrunkServer) -> None:
    """`python -m server`; `server_class` lets scripts/simulated_server.py run its variant with the same flags."""
    cfg = parse_config(argv)

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
                logger.info("signal %d: shutting down (grace %g s; again to stop at once)", signum, cfg.grace_s)
                threading.Thread(target=server.stop, daemon=True).start()
                return
            logger.warning("signal %d again: stopping at once; sessions in flight are lost", signum)
            server.abort()
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
