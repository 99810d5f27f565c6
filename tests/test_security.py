"""TLS, mutual TLS and the shared token: throwaway certificates made at test time."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.split_engine import SplitEngine
from server.app import TrunkServer
from server.config import ServerConfig
from splitcomm.errors import TrunkError
from splitcomm.trunk_client import TrunkClient, TrunkClientConfig
from splitcore.sampling import SamplingParams
from tests.conftest import ROOT, TINY, Replicas, make_pki, start_tiny_server, subprocess_env, tiny_split_engine

TOKEN = "s3cret-token"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(models_dir, pki, mtls=False) -> TrunkServer:
    return start_tiny_server(
        models_dir,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"] if mtls else None,
        auth_token=TOKEN,
        idle_timeout_s=300,
        grace_s=0.5,
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["one server", "two replicas"])
def tls_server(models_dir, pki, tiny, request):
    """TLS and the token on every replica; the client names them all and balances over them."""
    replicas = Replicas([_server(models_dir, pki) for _ in range(request.param)])
    yield replicas
    replicas.stop(0.5)


def _engine(models_dir, target, **kw) -> SplitEngine:
    return tiny_split_engine(models_dir, target, connect_timeout_s=3, **kw)


def test_tls_with_token_generates_correctly(models_dir, pki, tls_server, tiny):
    from splitcore.engine import FullEngine

    engine = _engine(models_dir, tls_server.target, tls_ca=pki["ca"], auth_token=TOKEN)
    want = FullEngine(tiny, torch.device("cpu"), torch.float32).run("Secure hello", 15, GREEDY).token_ids
    for _ in range(2 * len(tls_server.servers)):  # round robin: each replica serves one at least
        assert engine.run("Secure hello", 15, GREEDY).token_ids == want
    assert all(s.sessions.counters.total_sessions for s in tls_server.servers)
    engine.close()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_wrong_or_missing_token_is_unauthenticated_and_nothing_computed(models_dir, pki, tls_server, token):
    steps = tls_server.total_steps()
    engine = _engine(models_dir, tls_server.target, tls_ca=pki["ca"], auth_token=token)
    with pytest.raises(TrunkError) as e:
        engine.server_info()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(TrunkError) as e:
        engine.run("Sneaky", 3, GREEDY)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "token" in str(e.value)
    with pytest.raises(TrunkError) as e:
        list(TrunkClient(TrunkClientConfig(tls_server.target, tls_ca=pki["ca"], token=token)).monitor(max_samples=1))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert tls_server.total_steps() == steps and tls_server.active() == 0
    engine.close()


def test_plaintext_or_untrusted_client_cannot_connect(pki, tls_server):
    for kw in ({}, {"tls_ca": pki["other_ca"]}):
        client = TrunkClient(TrunkClientConfig(tls_server.target, connect_timeout_s=2, token=TOKEN, **kw))
        with pytest.raises(TrunkError) as e:
            client.info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        client.close()


def test_health_check_needs_no_token(pki, tls_server):
    creds = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes())
    for srv in tls_server.servers:
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_requires_client_certificate(models_dir, pki, tiny):
    srv = _server(models_dir, pki, mtls=True)
    try:
        no_cert = TrunkClient(
            TrunkClientConfig(f"127.0.0.1:{srv.port}", tls_ca=pki["ca"], token=TOKEN, connect_timeout_s=2)
        )
        with pytest.raises(TrunkError) as e:
            no_cert.info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        no_cert.close()
        engine = _engine(
            models_dir,
            f"127.0.0.1:{srv.port}",
            tls_ca=pki["ca"],
            tls_cert=pki["client_cert"],
            tls_key=pki["client_key"],
            auth_token=TOKEN,
        )
        assert len(engine.run("Mutual", 5, GREEDY).token_ids) == 5
        engine.close()
    finally:
        srv.stop(0.5)


def test_insecure_bind_beyond_loopback_warns(models_dir, tiny, caplog):
    srv = TrunkServer(ServerConfig(model=TINY, models_dir=str(models_dir), host="0.0.0.0", port=0, grace_s=0))
    with caplog.at_level(logging.WARNING, logger="server.app"):
        srv.start()
    srv.stop(0)
    assert "without TLS" in caplog.text


# --- No open doors by default (docs/privacy.md, "Who can reach what") ---------------------------------------


def _app_args(**kw):
    import argparse

    return argparse.Namespace(**({"host": "127.0.0.1", "auth": None, "no_auth": False} | kw))


def test_apps_listen_on_loopback_and_beyond_it_only_with_a_login_or_on_purpose(caplog):
    from frontend.cli import app_login, app_settings
    from splitcore.errors import InvalidInput

    settings = app_settings("GPT2_X_PORT", 1, "GPT2_X_LOG", "x.log")
    assert settings().host == "127.0.0.1"
    assert app_login(_app_args()) is None
    with pytest.raises(InvalidInput, match="would listen on 0.0.0.0 with no login.*--auth USER:PASS.*--no-auth"):
        app_login(_app_args(host="0.0.0.0"))
    assert app_login(_app_args(host="0.0.0.0", auth="ada:pw:with:colons")) == ("ada", "pw:with:colons")
    with pytest.raises(InvalidInput, match="--auth: give USER:PASS"):
        app_login(_app_args(auth="ada"))
    with caplog.at_level("WARNING"):
        assert app_login(_app_args(host="0.0.0.0", no_auth=True)) is None
    assert "with no login (--no-auth)" in caplog.text


def test_an_app_on_an_open_address_is_refused_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "client", "serve", "--host", "0.0.0.0", "--model", TINY],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: the app would listen on 0.0.0.0 with no login: anyone who reaches it could generate and fine-tune; "
        "give --auth USER:PASS (or GPT2_UI_AUTH), or --no-auth to serve it open on purpose"
    ]


def test_the_finetune_tab_reads_uploads_or_the_data_folder_only(tmp_path):
    import gradio as gr

    from client.finetune_tab import inside

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("text")
    (tmp_path / "secret").write_text("key")
    (data / "link").symlink_to(tmp_path / "secret")
    assert inside("sub/a.txt", str(data)) == (data / "sub" / "a.txt").resolve()
    assert inside(str(data / "sub"), str(data)) == (data / "sub").resolve()
    for escape in ("../secret", str(tmp_path / "secret"), "link", "/etc/passwd", "~/.ssh/id_rsa"):
        with pytest.raises(gr.Error, match="outside the data folder"):
            inside(escape, str(data))
    with pytest.raises(gr.Error, match="reads uploads only"):
        inside("sub/a.txt", None)


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"server": "10.1.2.3:50051"}, True),
        ({"server": "127.0.0.1:50051,gpu-host:50051"}, True),
        ({"server": "10.1.2.3:50051", "insecure": True}, False),
        ({"server": "10.1.2.3:50051", "tls_ca": "ca.pem"}, False),
        ({"server": "127.0.0.1:50051,localhost:50052"}, False),
        ({"server": "[::1]:50051"}, False),
    ],
)
def test_the_client_sends_no_token_in_clear_beyond_loopback(settings, refused):
    from client.config import ClientConfig
    from splitcore.errors import InvalidInput

    cfg = ClientConfig(auth_token="s3cret", **settings)
    if refused:
        with pytest.raises(InvalidInput, match="--auth-token would cross to .* in the clear.*--tls-ca.*--insecure"):
            cfg.trunk_client_config()
    else:
        assert cfg.trunk_client_config().token == "s3cret"


def test_the_defence_seed_is_hidden_and_warns(models_dir, caplog):
    from client.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    for command in ("generate", "serve", "api", "train"):
        assert "--defence-seed" not in sub.choices[command].format_help(), command
    with caplog.at_level("WARNING"):
        tiny_split_engine(models_dir, local_trunk=True, defence="gaussian", noise_scale=1.0, defence_seed=3).close()
    assert "--defence-seed 3: the noise is a function of this seed" in caplog.text
