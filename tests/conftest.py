"""Shared fixtures: a tiny random GPT-2 saved to disk and loaded back like any user's model, and a server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from splitcore.models import ResolvedModel, load_full_model, resolve_model  # noqa: E402

TINY = "random:tiny"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    os.environ["GPT2_MODELS_DIR"] = str(d)  # for subprocesses started by tests
    return d


@pytest.fixture(scope="session")
def tiny(models_dir) -> ResolvedModel:
    return resolve_model(TINY, models_dir)


@pytest.fixture(scope="session")
def full_model(tiny):
    return load_full_model(tiny.path, "sdpa", torch.float32, "cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from splitcore.models import load_tokenizer

    return load_tokenizer(tiny.path)


@pytest.fixture(scope="session")
def server(models_dir, tiny):
    """A real trunk server for random:tiny on 127.0.0.1 and a free port."""
    from server.app import TrunkServer
    from server.config import ServerConfig

    srv = TrunkServer(
        ServerConfig(
            model=TINY,
            models_dir=str(models_dir),
            host="127.0.0.1",
            port=0,
            max_sessions=24,
            idle_timeout_s=0,
            grace_s=1,
        )
    )
    srv.start()
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
