"""The shape of the code base: imports run one way (worker -> service -> shortened), no module
imports itself back through others, and names shared by the spec and the engine agree."""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest

LAYERS = ["shortened", "service", "worker"]  # each may import only those before it


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*LAYERS)


def test_imports_run_one_way(graph) -> None:
    upward = []
    for module in graph.modules:
        layer = LAYERS.index(module.split(".")[0])
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_no_import_cycles(graph) -> None:
    """Tarjan's strongly connected components over module-level and function-level imports."""
    modules = sorted(graph.modules)
    edges = {
        m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules)) for m in modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("package", LAYERS)
def test_each_package_imports_alone(package: str) -> None:
    """Every top-level package imports in a fresh interpreter by itself (no import-order luck)."""
    result = subprocess.run(
        [sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_spec_criteria_match_the_engine_registry() -> None:
    from shortened.engine.criteria import CRITERIA as ENGINE_CRITERIA
    from shortened.specs import CRITERIA as SPEC_CRITERIA

    assert sorted(SPEC_CRITERIA) == sorted(ENGINE_CRITERIA)
