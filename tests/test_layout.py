"""The architecture, checked: the shared core imports neither the web tier nor the worker, the
worker loads no Flask, and no module imports itself through a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)

PACKAGES = ("relay", "worker")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports, anywhere in it (deferred imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in edges.get(node, ()):
            # A package's __init__ importing its own modules is not a circle of the design.
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_the_import_graph_has_no_circle():
    assert cycles(graph()) == []


def test_the_core_imports_neither_the_web_tier_nor_the_worker():
    for name, imported in graph().items():
        if name.startswith("relay.core"):
            outside = {m for m in imported if not m.startswith("relay.core")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_web_tier_and_the_worker_do_not_import_each_other_or_the_dev_tools():
    for name, imported in graph().items():
        if name.startswith("relay.web"):
            assert not {m for m in imported if m.startswith(("worker", "relay.dev"))}, name
        if name.startswith("worker"):
            assert not {m for m in imported if m.startswith(("relay.web", "relay.dev"))}, name


def test_the_worker_loads_no_flask():
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, worker.main, worker.__main__; print(sorted(sys.modules))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    modules_loaded = set(ast.literal_eval(loaded))
    web = {m for m in modules_loaded if m.split(".")[0] in ("flask", "werkzeug", "jinja2")}
    assert not web and not {m for m in modules_loaded if m.startswith("relay.web")}
    assert "worker.main" in modules_loaded and "relay.core.jobs" in modules_loaded


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
