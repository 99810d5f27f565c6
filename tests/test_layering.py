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
        (["splitcore"], "fastapi"),
        (["splitcore"], "uvicorn"),
        (["splitcore"], "gradio"),
        (["splitcomm"], "transformers"),
        (["baseline", "webui", "frontend"], "grpc"),
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


def test_no_import_cycle_in_the_core():
    """No two modules of splitcore import each other, directly or through others, counting the imports inside
    functions too (a cycle that only works because one side imports late is still a cycle of concepts)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in (ROOT / "splitcore").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("splitcore."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "splitcore":
                names |= {a.name for a in node.names}
        graph[path.stem] = names - {path.stem}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for n in graph.get(start, ()):
            if n == goal or (n not in seen and reaches(n, goal, seen | {n})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, f"modules in an import cycle: {cycles}"


def _imported(path) -> set[str]:
    """Every module a file imports, at its top or inside functions (`from a import b` counts as a and a.b)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_wire_stays_in_splitcomm_and_the_servicers():
    """client/ imports no generated protobuf module (it goes through splitcomm); in server/ only the servicers and
    the code that registers services do; webui/ imports nothing from client/."""
    pb2 = {
        f"{p.parent.name}/{p.name}"
        for pkg in ("client", "server")
        for p in (ROOT / pkg).glob("*.py")
        if any(m.endswith(("_pb2", "_pb2_grpc")) for m in _imported(p))
    }
    assert pb2 == {"server/servicer.py", "server/train_servicer.py", "server/app.py"}
    up = {p.name for p in (ROOT / "webui").glob("*.py") if any(m.split(".")[0] == "client" for m in _imported(p))}
    assert not up, f"webui imports client in {sorted(up)}"
