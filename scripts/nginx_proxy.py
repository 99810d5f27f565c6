"""nginx from Debian's package in front of trunk replicas, running deploy/nginx.conf with its upstream pointed at
the replicas given: what the tests and scripts/bench_server.py put between clients and replicas.

    python scripts/nginx_proxy.py --listen 50050 127.0.0.1:50051 127.0.0.1:50052   # until Ctrl-C
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "deploy" / "nginx.conf"


def find_nginx() -> str | None:
    """The nginx binary (Debian puts it in /usr/sbin, which a user's PATH may lack), or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def render(replicas: list[str], listen: str) -> str:
    """deploy/nginx.conf with one upstream server line per replica (host:port) and `listen` (port or host:port)."""
    conf = CONF.read_text()
    lines = "".join(f"        server {r} max_fails=1 fail_timeout=5s;\n" for r in replicas)
    conf, n = re.subn(r"(        server 127\.0\.0\.1:\d+ [^\n]*\n)+", lines, conf)
    if n != 1:
        raise ValueError(f"{CONF}: the upstream's server lines were not found")
    conf, n = re.subn(r"listen 50050 http2;", f"listen {listen} http2;", conf)
    if n != 1:
        raise ValueError(f"{CONF}: its listen line was not found")
    return conf


class Nginx:
    """A running nginx over `replicas`, listening on 127.0.0.1:`port` (0: a free one); stop() ends it."""

    def __init__(self, replicas: list[str], port: int = 0, prefix: Path | None = None):
        binary = find_nginx()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt install nginx)")
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.prefix = prefix or Path(tempfile.mkdtemp(prefix="trunk-nginx-"))
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(render(replicas, self.address))
        with open(self.prefix / "stderr.log", "w") as err:  # nginx keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"], stderr=err
            )
        deadline = time.monotonic() + 20
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start: {(self.prefix / 'stderr.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=int, default=50050)
    p.add_argument("replicas", nargs="+", help="host:port of each replica")
    args = p.parse_args()
    try:
        proxy = Nginx(args.replicas, args.listen)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"nginx on {proxy.address} over {', '.join(args.replicas)} (config in {proxy.prefix}); Ctrl-C stops it")
    try:
        proxy.proc.wait()
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
