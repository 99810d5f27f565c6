"""The layering, checked in fresh processes: the model core never pulls in the network, the network never pulls
in transformers, and the no-network baseline never pulls in gRPC."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)]) if m.name != "__main__"]


@pytest.mark.parametrize(
    ("packages", "forbidden"),
    [
        (["splitcore"], "grpc"),
        (["splitcomm"], "transformers"),
        (["baseline"], "grpc"),
    ],
)
def test_imports_stay_in_their_layer(packages, forbidden):
    modules = [m for p in packages for m in _modules(p)]
    assert modules
    load = f"for m in {modules!r}: importlib.import_module(m)"
    code = "\n".join(["import importlib, sys", load, f"print({forbidden!r} in sys.modules)"])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"importing {packages} loads {forbidden}"
