"""Running the project's scripts and commands as a user runs them: a process group of its own (so that Ctrl-C can be
sent as a terminal sends it, to the whole group), the environment a user's shell has (no virtual environment on
PATH, no PYTHONPATH: the scripts set up their own), and checks of what a user would look at (ports answering, a
generation, nothing left running)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

from tests.conftest import ROOT, TINY


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: this one's, less the project's virtual environment and PYTHONPATH (what the scripts add
    themselves), with the small test model and quiet hosts (127.0.0.1) unless `extra` says otherwise. The models'
    folder is the test session's (GPT2_MODELS_DIR, set by conftest)."""
    env = dict(os.environ)
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    env |= {"GPT2_MODEL": TINY, "GPT2_SERVER_HOST": "127.0.0.1", "GPT2_UI_HOST": "127.0.0.1"}
    env |= extra
    return env


def free_ports(n: int) -> list[int]:
    """`n` consecutive free ports on 127.0.0.1 (run_all.sh's replicas take GPT2_SERVER_PORT and the ones after)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(port_free(base + i) for i in range(n)):
            return [base + i for i in range(n)]
    raise RuntimeError(f"no {n} consecutive free ports")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def grpc_serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Script:
    """A command started as a user starts it from a terminal, its output in `log` (a file)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.cmd, self.log = cmd, log
        self._out = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, checks: dict[str, callable], timeout: float = 240) -> None:
        """Until every check passes; fails at once, with the output, if the command exits first."""
        end = time.monotonic() + timeout
        pending = dict(checks)
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"{' '.join(self.cmd)} exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            pending = {name: check for name, check in pending.items() if not check()}
            if pending and time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {', '.join(pending)}:\n{self.output()[-3000:]}")
            if pending:
                time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        """The command's process and every process under it."""
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def ctrl_c(self, ports: list[int], timeout: float = 60) -> None:
        """Ctrl-C as a terminal sends it (SIGINT to the whole process group), then: the command exits, every
        process it started has exited, and every port it used is free."""
        started = self.processes()
        assert any("python" in " ".join(p.cmdline()) for p in started), "the script runs no Python process"
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.cmd} still runs {timeout} s after Ctrl-C:\n{self.output()[-3000:]}") from None
        gone, alive = psutil.wait_procs(started, timeout=15)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"still running after Ctrl-C: {[' '.join(p.cmdline()) for p in alive]}"
        busy = [p for p in ports if not port_free(p)]
        assert not busy, f"ports still taken after Ctrl-C: {busy}"
        self._out.close()

    def stop(self) -> None:
        """Whatever is left, killed (a failed test's cleanup)."""
        if self.proc.poll() is None:
            try:
                for p in self.processes()[::-1]:
                    p.kill()
            except psutil.Error:
                pass
            self.proc.wait(10)
        self._out.close()


def app_generate(port: int, prompt: str, max_tokens: int = 8) -> str:
    """One greedy generation through an app's HTTP API (Gradio's /generate endpoint), as gradio_client calls it."""
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    try:
        out = client.predict(prompt, max_tokens, 0.0, 0, 1.0, -1, "none", "none (the base model)", api_name="/generate")
    finally:
        client.close()
    text, _stats, error = out[0], out[1], out[2]
    assert not error, error
    return text
