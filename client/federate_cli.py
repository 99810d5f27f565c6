"""`python -m client federate serve|join`: the fed server (a Flower SuperLink and this project's ServerApp) and a
data owner (a Flower SuperNode that runs this project's ClientApp). Both are Flower's own processes, started,
watched and stopped here; their full logs go to files, and the rounds' progress lines to the terminal."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from client.config import ClientConfig, FederationConfig
from splitcore.errors import InvalidInput
from splitcore.settings import ProcessConfig, dataclass_flags, is_loopback

APP_DIR = Path(__file__).resolve().parent / "flower_app"
ROOT = APP_DIR.parent.parent


@dataclass
class FedServerArgs:
    """Where the fed server's SuperLink listens (its Fleet, Control and Runtime APIs share the port)."""

    host: str = "127.0.0.1"  # beyond loopback needs TLS (--tls-cert, --tls-key, --tls-ca) or --insecure
    port: int = 9092
    tls_cert: str = ""  # the SuperLink's TLS certificate (PEM), naming the host the owners dial and 127.0.0.1
    tls_key: str = ""  # its private key (PEM)
    tls_ca: str = ""  # the CA that signed it (PEM): the owners' --federation-ca
    insecure: bool = False  # listen beyond loopback without TLS (anyone who reaches the port can submit runs)

    def tls(self) -> bool:
        """Whether the Flower link runs TLS; all three files, or none."""
        given = [x for x in (self.tls_cert, self.tls_key, self.tls_ca) if x]
        if given and len(given) < 3:
            raise InvalidInput("TLS on the Flower link needs all three of --tls-cert, --tls-key and --tls-ca")
        for path in given:
            if not Path(path).is_file():
                raise InvalidInput(f"no such file: {path}")
        return bool(given)


@dataclass
class OwnerArgs:
    """A data owner: its text, the fed server, and where its SuperNode keeps its state."""

    data: str = ""  # this owner's text: a file or a directory of .txt files (required); its last 10% is held out
    federation: str = "127.0.0.1:9092"  # the fed server's SuperLink, host:port
    federation_ca: str = ""  # the CA of the fed server's certificate (PEM): the Flower link runs TLS
    name: str = ""  # how the fed server's log names this owner (default: the data's file or folder name)
    workdir: str = ""  # this owner's SuperNode state and log (default: .federate/NAME)


def add_federate_command(sub, add_split_args) -> None:
    f = sub.add_parser(
        "federate",
        help="federated split learning on Flower: many data owners train one model (serve: the fed server; join: "
        "an owner)",
        description="SplitFed on Flower's deployment runtime. `serve` runs the fed server (a SuperLink and FedAvg, "
        "checkpointed each round); each data owner runs `join` with its own text and the trunk server. Owners "
        "train against the trunk and send the fed server their weights; the text never leaves them and the trunk "
        "never gets their weights (docs/federated.md).",
    )
    fsub = f.add_subparsers(dest="federate_command", required=True)
    s = fsub.add_parser("serve", help="the fed server: waits for --min-owners owners, runs --rounds, saves the adapter")
    dataclass_flags(s, FederationConfig)
    dataclass_flags(s, FedServerArgs)
    dataclass_flags(s, ProcessConfig)
    j = fsub.add_parser(
        "join",
        help="a data owner: trains each round on its --data against the trunk --server",
        description="A data owner. Its text (--data), trunk server (--server, its TLS and token) and defences "
        "(--defence, --grad-noise, --grad-clip) are its own; the model and the training recipe are the federation's "
        "(`federate serve`), so --model here is not used.",
    )
    add_split_args(j)
    dataclass_flags(j, OwnerArgs)


def run_federate(args: argparse.Namespace) -> None:
    # SIGTERM (a service manager, `kill`) stops Flower's processes as Ctrl-C does, instead of orphaning them
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.federate_command == "serve":
        serve(args)
    else:
        join(args)


# --- processes ---------------------------------------------------------------------------------------------
def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # the apps import this project
    env["FLWR_HOME"] = str(flwr_home)
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp...): from this Python's
    # environment, activated or not
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink binds: a restart finds it free
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _wait_listening(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise InvalidInput(f"the SuperLink exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection((host if not host.startswith("0.") else "127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise InvalidInput(f"the SuperLink did not listen on {host}:{port} within {timeout:.0f} s: {_tail(log)}")


def _tail(log: Path, n: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen | None, grace: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _relay(proc: subprocess.Popen, log: Path, mark: str) -> None:
    """Copy a process's output to its log; show the lines that carry `mark` (and errors) on the terminal."""
    with log.open("a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if mark in line:
                print(line.split(mark, 1)[1].rstrip(), file=sys.stderr, flush=True)
            elif "ERROR" in line or "Traceback" in line:
                print(line.rstrip(), file=sys.stderr, flush=True)


# --- the fed server ----------------------------------------------------------------------------------------
def federation_config(args: argparse.Namespace) -> FederationConfig:
    fed = FederationConfig(**{f.name: getattr(args, f.name) for f in fields(FederationConfig)})
    fed.check()
    return fed


def _saved_settings(path: Path) -> str | None:
    """A run's saved settings, with today's defaults for settings it predates; None where unreadable."""
    try:
        return FederationConfig.from_json(path.read_text()).to_json()
    except (ValueError, TypeError):
        return None


def _settings_file(fed: FederationConfig) -> Path:
    """federation.json in --out: written once; a restart with the same settings resumes, other settings are
    refused (another --out starts afresh)."""
    from client.federated import SETTINGS_FILE, last_round

    out = Path(fed.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    if path.is_file() and _saved_settings(path) != fed.to_json():
        raise InvalidInput(
            f"{out} holds a federated run with other settings ({path}): give the same settings to resume it, or "
            "another --out"
        )
    path.write_text(fed.to_json())
    done = last_round(out)[0]
    if done:
        print(f"resuming after round {done} of {fed.rounds} (checkpoint in {out}/round-{done})", file=sys.stderr)
    return path


def serve(args: argparse.Namespace) -> None:
    fed = federation_config(args)
    where = FedServerArgs(**{f.name: getattr(args, f.name) for f in fields(FedServerArgs)})
    tls = where.tls()
    if not is_loopback(where.host) and not where.insecure and not tls:
        raise InvalidInput(
            f"the SuperLink would listen on {where.host} without TLS: anyone who reaches it could submit runs to "
            "the owners; give --tls-cert, --tls-key and --tls-ca, or --insecure to do it on purpose (on a private "
            "network)"
        )
    if not _port_free(where.host, where.port):
        raise InvalidInput(f"port {where.port} on {where.host} is in use: give another --port")
    settings = _settings_file(fed)
    out = settings.parent
    home = out / ".flwr"
    home.mkdir(exist_ok=True)
    # `flwr run` below submits the run to this SuperLink on 127.0.0.1 (over TLS: the certificate must name it)
    trust = f'root-certificates = "{Path(where.tls_ca).resolve()}"' if tls else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{where.port}"\n{trust}\n'
    )
    security = ["--insecure"]
    if tls:
        security = [f"--ssl-{k}file={Path(v).resolve()}" for k, v in
                    (("cert", where.tls_cert), ("key", where.tls_key), ("ca-cert", where.tls_ca))]  # fmt: skip
    env, log = _env(home), out / "federate.log"
    link = run = None
    try:
        with log.open("a") as f:
            link = subprocess.Popen(
                [_tool("flower-superlink"), *security, "--host", where.host, "--port", str(where.port),
                 "--disable-runtime-dependency-installation", "--database", str(home / "state.db")],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip
        _wait_listening(where.host, where.port, link, log)
        print(
            f"fed server on {where.host}:{where.port} ({'TLS' if tls else 'no TLS'}): waiting for {fed.min_owners} "
            f"owners (python -m client federate join --federation HOST:{where.port}"
            f"{' --federation-ca CA' if tls else ''} --data DIR --server TRUNK); {fed.rounds} rounds of "
            f"{fed.local_steps} steps{', SecAgg+' if fed.secagg else ''}; log in {log}",
            file=sys.stderr,
        )
        run = subprocess.Popen(
            [_tool("flwr"), "run", str(APP_DIR), "fed", "--run-config", f'federation="{settings}"', "--stream"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        from client.federated import MARK

        _relay(run, log, MARK)
        if run.wait() != 0 or not (out / "adapter_config.json").is_file():
            raise InvalidInput(f"the federated run failed (flwr run exited {run.returncode}); see {log}")
    finally:
        _stop(run)
        _stop(link)


# --- an owner ----------------------------------------------------------------------------------------------
def join(args: argparse.Namespace) -> None:
    from client.federated import OWNER_MARK, Owner
    from splitcore.training import read_text

    owner = OwnerArgs(**{f.name: getattr(args, f.name) for f in fields(OwnerArgs)})
    if not owner.data:
        raise InvalidInput("--data is required: this owner's text (a file or a directory of .txt files)")
    read_text(owner.data, "--data")  # there, and text: refused now rather than in the first round
    host, sep, port = owner.federation.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"--federation: give the fed server as host:port; got '{owner.federation}'")
    if owner.federation_ca and not Path(owner.federation_ca).is_file():
        raise InvalidInput(f"--federation-ca: no such file: {owner.federation_ca}")
    if not owner.federation_ca and not is_loopback(host):
        print(f"owner: the link to the fed server at {owner.federation} is not encrypted (no --federation-ca)",
              file=sys.stderr)  # fmt: skip
    data = Path(owner.data).resolve()
    name = owner.name or data.stem
    work = Path(owner.workdir or Path(".federate") / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    client = ClientConfig(**{f.name: getattr(args, f.name) for f in fields(ClientConfig)})
    client.trunk_client_config()  # the trunk's address and credentials, checked before the SuperNode starts
    Owner(client, str(data), name).save(work / "owner.json")
    home = work / ".flwr"
    home.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        app_port = s.getsockname()[1]  # the SuperNode's API for its ClientApp processes
    trust = [f"--root-certificates={Path(owner.federation_ca).resolve()}"] if owner.federation_ca else ["--insecure"]
    node = subprocess.Popen(
        [_tool("flower-supernode"), *trust, "--superlink", owner.federation, "--port", str(app_port),
         "--node-config", f'owner="{work / "owner.json"}"'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home), cwd=ROOT,
    )  # fmt: skip
    print(
        f"owner {name}: {data} stays here; training against the trunk at {client.server} for the fed server at "
        f"{owner.federation} (Ctrl-C to leave); log in {work / 'supernode.log'}",
        file=sys.stderr,
    )
    try:
        _relay(node, work / "supernode.log", OWNER_MARK)
        if node.wait() != 0:
            raise InvalidInput(f"the SuperNode exited ({node.returncode}); see {work / 'supernode.log'}")
    finally:
        _stop(node)
