"""The images (deploy/Containerfile), built as a user builds them where no base image can be pulled: Debian
bookworm debootstrapped and imported, then `buildah bud` (scripts/build_images.sh). The trunk server runs from the
trunk image and a generation from the client image against it, both with `buildah run --isolation chroot` on the
host's network (this machine cannot start containers otherwise). Also: who they run as, what they hold, and
deploy/compose.yaml against the tested nginx config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY, free_port

PREFIX = "localhost/gpt2split-test-"
DEPLOY = ROOT / "deploy"
PROMPT = "The quick brown fox"
THEIR_TESTS = re.compile(r"/(tests?|testing|SelfTest)/|/test_[^/]*$", re.I)
PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----\s+[A-Za-z0-9+/=\s]{64,}-----END")  # a key block


def _tools_or_skip() -> None:
    missing = [t for t in ("buildah", "debootstrap") if not shutil.which(t)]
    if missing:
        if os.environ.get("GPT2_REQUIRE_BROWSER") == "1":  # CI: every tool the tests install must be there
            pytest.fail(f"CI needs {', '.join(missing)} (scripts/test.sh installs them with apt-get)")
        pytest.skip(f"needs {', '.join(missing)} (Debian packages)")


def buildah(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 or not check, f"buildah {' '.join(args)}: {r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """trunk-cpu and client, built by scripts/build_images.sh from a debootstrapped base (made once per machine:
    localhost/gpt2split-debian:bookworm)."""
    _tools_or_skip()
    log = tmp_path_factory.mktemp("images") / "build.log"
    env = dict(os.environ, GPT2_IMAGE_PREFIX=PREFIX)
    with log.open("w") as f:
        r = subprocess.run(
            ["bash", "scripts/build_images.sh"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1500
        )
    assert r.returncode == 0, log.read_text()[-4000:]
    return {t: PREFIX + t for t in ("trunk-cpu", "client")}


class Container:
    """A working container of an image; `run` runs a command in it (chroot isolation, the host's network)."""

    def __init__(self, image: str):
        self.name = buildah("from", "--pull-never", image).stdout.strip()

    def args(self, *cmd: str, env: dict | None = None, volumes: dict | None = None) -> list[str]:
        out = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for k, v in (env or {}).items():
            out += ["--env", f"{k}={v}"]
        for host, inside in (volumes or {}).items():
            out += ["-v", f"{host}:{inside}"]
        return [*out, self.name, "--", *cmd]

    def run(self, *cmd: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(*cmd, **kw), capture_output=True, text=True, timeout=timeout)

    def remove(self) -> None:
        buildah("rm", self.name, check=False)


@pytest.fixture
def containers(images):
    made = []

    def make(target: str) -> Container:
        made.append(Container(images[target]))
        return made[-1]

    yield make
    for c in made:
        c.remove()


def hf_greedy(tiny, ids: list[int], n: int) -> list[int]:
    from tests.conftest import load_hf_model

    hf = load_hf_model(tiny.path)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256, eos_token_id=None)
    return out[0, len(ids) :].tolist()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trunk_image_serves_the_client_image_hf_greedy(containers, tiny, tokenizer, tmp_path):
    """The trunk server from the trunk image (as its user, the model built into a models volume), healthy by the
    image's own health check; `python -m client generate` from the client image through it gives Hugging Face's
    greedy tokens."""
    models = tmp_path / "models"
    models.mkdir()
    os.chown(models, 10001, 10001)  # the images' user writes the model there (a volume, never the image)
    port, metrics = free_port(), free_port()
    trunk, client = containers("trunk-cpu"), containers("client")
    env = {"GPT2_SERVER_PORT": str(port), "GPT2_METRICS_PORT": str(metrics), "GPT2_SERVER_HOST": "127.0.0.1"}
    log = (tmp_path / "trunk.log").open("w")
    server = subprocess.Popen(
        trunk.args("python", "-m", "server", "--model", TINY, env=env, volumes={models: "/models"}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 300
        while trunk.run("python", "/opt/gpt2split/deploy/healthcheck.py", "grpc", env=env, timeout=60).returncode:
            assert server.poll() is None, (tmp_path / "trunk.log").read_text()[-3000:]
            assert time.monotonic() < end, "the trunk image never became healthy"
            time.sleep(1)
        out = client.run(
            "python", "-m", "client", "generate", "--model", TINY, "--server", f"127.0.0.1:{port}",
            "--max-tokens", "12", "--temperature", "0", "--json", PROMPT,
            volumes={models: "/models"},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout)["token_ids"]
        assert got == hf_greedy(tiny, tokenizer(PROMPT).input_ids, 12)
        # the server ran as the image's user, and wrote the model into the volume
        owners = {p.stat().st_uid for p in models.rglob("*")}
        assert owners == {10001}, owners
        assert "trunk server ready" in (tmp_path / "trunk.log").read_text()
        # the client image's HTTP health check: unhealthy before its API listens, healthy after
        api_env = {"GPT2_API_PORT": str(free_port()), "GPT2_CLIENT_PORT": str(free_port())}
        check = ("python", "/opt/gpt2split/deploy/healthcheck.py", "http")
        assert client.run(*check, env=api_env, timeout=60).returncode == 1
        api = subprocess.Popen(
            client.args(
                "python", "-m", "client", "api", "--model", TINY, "--server", f"127.0.0.1:{port}",
                env=api_env | {"GPT2_API_HOST": "127.0.0.1"}, volumes={models: "/models"},
            ),
            stdout=(tmp_path / "api.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            end = time.monotonic() + 180
            while client.run(*check, env=api_env, timeout=60).returncode:
                assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
                assert time.monotonic() < end, "the client image's API never became healthy"
                time.sleep(1)
        finally:
            os.killpg(api.pid, 15)
            api.wait(30)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the images are built first where this runs alone
def test_images_run_as_a_user_and_hold_no_model_key_or_token(images):
    """Every image's user is `split` (10001), never root; no file in it is a model's weights, a private key, or
    the build host's CA bundle (mounted into the build as a secret, never kept)."""
    host_bundle = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    host_ca = host_bundle.read_bytes() if host_bundle.is_file() else None
    for image in images.values():
        config = json.loads(buildah("inspect", "--type", "image", image).stdout)
        assert config["Docker"]["config"]["User"] == "split", image
        assert config["Docker"]["config"]["Healthcheck"]["Test"][:2] == ["CMD", "python"], image
        env_names = [e.split("=")[0] for e in config["Docker"]["config"]["Env"]]
        secret_env = [e for e in env_names if re.search(r"TOKEN|AUTH|KEY|PASS", e)]
        assert not secret_env, secret_env  # no token, login or key baked into the environment
        name = buildah("from", "--pull-never", image).stdout.strip()
        try:
            root = Path(buildah("mount", name).stdout.strip())
            assert (root / "etc/passwd").read_text().count(":10001:10001:") == 1
            weights, keys, same_ca = [], [], []
            for p in root.rglob("*"):
                if p.is_symlink() or not p.is_file():
                    continue
                rel = "/" + str(p.relative_to(root))
                size = p.stat().st_size
                torch_file = p.suffix in (".pt", ".pth", ".bin") and size > 1 << 20  # (.pth: also Python's paths)
                if re.search(r"\.(safetensors|gguf|ckpt)$|^pytorch_model.*\.bin$", p.name) or torch_file:
                    weights.append(rel)
                if size < 1 << 20 and not rel.startswith(("/usr/share/doc", "/usr/lib/x86_64-linux-gnu")):
                    third_party_fixture = "site-packages" in rel and THEIR_TESTS.search(rel)  # packages' own tests
                    if PEM_KEY.search(p.read_bytes()) and not third_party_fixture:
                        keys.append(rel)
                if host_ca is not None and size == len(host_ca) and p.read_bytes() == host_ca:
                    same_ca.append(rel)
            assert not weights, weights
            assert not keys, keys
            assert not list((root / "models").iterdir())
            assert not (root / "run/secrets").exists() or not list((root / "run/secrets").iterdir())
        finally:
            buildah("umount", name, check=False)
            buildah("rm", name, check=False)


# --- deploy/compose.yaml -----------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _nginx() -> tuple[list[str], str]:
    text = (DEPLOY / "nginx.conf").read_text()
    upstream = re.findall(r"^\s*server\s+(\S+:\d+)", text, re.M)
    listen = re.search(r"^\s*listen\s+(\d+)", text, re.M).group(1)
    return upstream, listen


def test_compose_matches_the_tested_nginx_config_and_the_images():
    """The replicas are exactly nginx.conf's upstream (the config the replica tests run), the client dials nginx's
    port, Prometheus scrapes each replica's metrics port, and every image is a target of deploy/Containerfile."""
    services = _compose()["services"]
    trunks = {k: v for k, v in services.items() if k.startswith("trunk")}
    upstream, listen = _nginx()
    assert len(trunks) >= 2
    env = {k: v["environment"] for k, v in trunks.items()}
    assert sorted(f"127.0.0.1:{e['GPT2_SERVER_PORT']}" for e in env.values()) == sorted(upstream)
    assert services["client"]["environment"]["GPT2_TRUNK_SERVER"] == f"127.0.0.1:{listen}"
    nginx = services["nginx"]
    assert any(v.startswith("./nginx.conf:") for v in nginx["volumes"])
    assert set(nginx["depends_on"]) == set(trunks)
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"][0]
    assert sorted(scraped["targets"]) == sorted(f"127.0.0.1:{e['GPT2_METRICS_PORT']}" for e in env.values())
    targets = set(re.findall(r"^FROM \S+ AS (\S+)", (DEPLOY / "Containerfile").read_text(), re.M))
    for name in [*trunks, "client"]:
        image = services[name]["image"]
        assert image.rsplit("}", 1)[-1].split(":")[0] in targets, image
        assert "/models" in " ".join(services[name]["volumes"])
    for s in services.values():
        assert s["network_mode"] == "host"  # nginx.conf's upstream is 127.0.0.1


@pytest.mark.skipif(not shutil.which("podman-compose"), reason="needs podman-compose (requirements-dev.txt)")
def test_compose_file_is_valid_for_compose(tmp_path):
    """`podman-compose config` reads it (interpolation, anchors, the services) as `podman compose up` would."""
    if not shutil.which("podman"):
        if os.environ.get("GPT2_REQUIRE_BROWSER") == "1":
            pytest.fail("CI needs podman (scripts/test.sh installs it with apt-get)")
        pytest.skip("podman-compose needs the podman command (Debian: podman)")
    env = dict(os.environ, GPT2_UI_AUTH="admin:change-me")
    r = subprocess.run(
        ["podman-compose", "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert set(resolved["services"]) == set(_compose()["services"])
    assert resolved["services"]["client"]["environment"]["GPT2_UI_AUTH"] == "admin:change-me"
