"""Shared fixtures: a tiny random GPT-2 saved to disk and loaded back like any user's model, and a server."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
# What starts a process, in a test's own code (conftest marks such a test `process`)
_PROCESS_WORDS = ("subprocess", "start_server_process", "sys.executable", "Popen", "run_bench", "nginx")
# A fixed English text that tests train and distil on (the project's README as it stood at d06d609), so that
# editing the docs changes no test's input.
CORPUS = ROOT / "tests" / "data" / "corpus.txt"
sys.path.insert(0, str(ROOT))

from splitcore.models import ResolvedModel, resolve_model  # noqa: E402

TINY = "random:tiny"


@pytest.fixture(scope="session", autouse=True)
def models_dir(tmp_path_factory) -> Path:
    """Where the session's models are built and saved; every test's subprocesses find it through
    GPT2_MODELS_DIR (set here for the whole session, so that no test asks for it only to have it set)."""
    d = tmp_path_factory.mktemp("models")
    os.environ["GPT2_MODELS_DIR"] = str(d)
    return d


@pytest.fixture(scope="session")
def tiny(models_dir) -> ResolvedModel:
    return resolve_model(TINY, models_dir)


def load_hf_model(path, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Hugging Face's GPT2LMHeadModel from a checkpoint directory: the reference the core is tested against."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return GPT2LMHeadModel.from_pretrained(str(path), attn_implementation=attn, dtype=dtype).eval()


@pytest.fixture(scope="session")
def full_model(tiny):
    """The HF reference model for random:tiny."""
    return load_hf_model(tiny.path)


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from splitcore.models import load_tokenizer

    return load_tokenizer(tiny.path)


def start_tiny_server(models_dir, **settings):
    """A started in-process trunk server for random:tiny on 127.0.0.1 (a free port unless `port` is given)."""
    from server.app import TrunkServer
    from server.config import ServerConfig

    cfg = dict(model=TINY, models_dir=str(models_dir), host="127.0.0.1", port=0, idle_timeout_s=0, device="cpu")
    cfg |= settings  # the CPU unless a test asks for a GPU: references are computed on the CPU in float32
    srv = TrunkServer(ServerConfig(**cfg))
    srv.start()
    return srv


class Replicas:
    """In-process trunk servers for random:tiny with the same settings: a replica set, and the client's target
    naming them all (round robin over them)."""

    def __init__(self, servers: list):
        self.servers = servers
        self.target = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        self.fingerprint = servers[0].fingerprint

    def active(self) -> int:
        return sum(s.sessions.active() for s in self.servers)

    def total_steps(self) -> int:
        return sum(s.sessions.counters.total_steps for s in self.servers)

    def wait_all_ready(self, client) -> None:
        """Until the balanced channel of `client` (a TrunkClient over `target`) reaches every replica: round robin
        alternates between those it is connected to, so calls from then on spread evenly."""
        names = {f"127.0.0.1:{s.port}" for s in self.servers}
        wait_for(lambda: {client.info().replica for _ in range(2 * len(names))} == names, 20, "every replica up")

    def stop(self, grace: float = 0.5) -> None:
        for s in self.servers:
            s.stop(grace)


def start_tiny_replicas(models_dir, n: int, **settings) -> Replicas:
    return Replicas([start_tiny_server(models_dir, **settings) for _ in range(n)])


def tiny_split_engine(models_dir, target: str | None = None, notify=None, **settings):
    """A split client for random:tiny on the CPU, against the trunk at `target` (or in-process with
    local_trunk=True); it fails at once when the trunk is lost unless `reconnect_s` says otherwise. `notify` hears
    what the engine would tell a user (a lost trunk, a replay)."""
    from client.config import ClientConfig
    from client.split_engine import SplitEngine

    settings.setdefault("reconnect_s", 0)
    if target is not None:
        settings["server"] = target
    return SplitEngine(ClientConfig(model=TINY, models_dir=str(models_dir), device="cpu", **settings), notify)


@pytest.fixture(scope="session")
def server(models_dir, tiny):
    """A real trunk server for random:tiny on 127.0.0.1 and a free port."""
    srv = start_tiny_server(models_dir, max_sessions=24, grace_s=1)
    yield srv
    srv.stop(1)


@pytest.fixture(scope="session")
def server_target(server) -> str:
    return f"127.0.0.1:{server.port}"


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(port: int, *args: str, log_file: str | None = None):
    """A trunk server in its own process on 127.0.0.1:port; returns the Popen once its ready line is out."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        TINY,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    if log_file:
        cmd += ["--log-file", log_file]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
    line = p.stdout.readline()
    if "ready on" not in line:
        p.kill()
        raise RuntimeError(f"server did not start: {line!r} {p.stderr.read()[-2000:]}")
    return p


def sigterm_another_thread(pid: int) -> None:
    """SIGTERM to process `pid` through a thread other than its main one, which then takes it: the kernel hands a
    process's signal to any of its threads that does not block it (Linux prefers the one whose id was named)."""
    import psutil

    other = next(t.id for t in psutil.Process(pid).threads() if t.id != pid)
    os.kill(other, signal.SIGTERM)


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until true, or fail naming what never happened."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test `browser` (the app tests in chromium) or `process` (it starts a process: its own code says
    so, or its module is about processes), so that `pytest -m "not slow and not process and not browser"` is a
    fast tier for the inner loop (docs/testing.md); `slow` is marked by hand where a test takes 3 s or more."""
    import inspect

    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module == "test_ui_browser":
            item.add_marker(pytest.mark.browser)
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        if module in ("test_replicas", "test_bench", "test_images") or any(w in source for w in _PROCESS_WORDS):
            item.add_marker(pytest.mark.process)


# --- throwaway certificates (TLS tests) ------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


def make_pki(d: Path) -> dict[str, str]:
    """Throwaway PEM files in `d`: a CA, a server certificate for localhost and 127.0.0.1, a client certificate
    (mutual TLS) and another CA that signed none of them."""
    ca_key = _key()
    ca = _cert("test CA", ca_key, "test CA", ca_key, ca=True)
    srv_key, cli_key = _key(), _key()
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    srv = _cert("localhost", srv_key, "test CA", ca_key, ca=False, sans=sans)
    cli = _cert("client", cli_key, "test CA", ca_key, ca=False)
    other_key = _key()
    other_ca = _cert("other CA", other_key, "other CA", other_key, ca=True)
    return {
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(d / "srv.pem", srv),
        "server_key": _write(d / "srv.key", key=srv_key),
        "client_cert": _write(d / "cli.pem", cli),
        "client_key": _write(d / "cli.key", key=cli_key),
        "other_ca": _write(d / "other.pem", other_ca),
    }
