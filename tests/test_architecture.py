"""The package's shape, checked from its own source: imports flow one way through the layers
named in docs/architecture.md, with no import circle (function-local and ``TYPE_CHECKING``
imports included), and functions stay small enough to read."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptkit"

# Lowest first. A module may import from its own layer (without a circle) or from a lower one.
# docs/architecture.md draws the same table.
LAYERS: list[set[str]] = [
    {"errors", "safeio", "memory"},
    {"components", "registry", "spec"},
    {"model", "data"},
    {"inference", "store", "evaluate"},
    {"training", "hf"},
    {"export"},
    {"serve"},
    {"bench", "testing", "quickstart"},
    # "" is gptkit/__init__.py, the lazy public face; plugin.py the plugin author's (it hands
    # out the contract checks of testing/ too)
    {"cli", "__main__", "", "plugin"},
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every gptkit module ``path`` imports anywhere in its body, with the packages whose
    ``__init__`` that import runs first. A package's own ``__init__`` always runs before its
    modules, so a module's import of a sibling adds no edge to their package (an explicit
    ``from gptkit.pkg import name`` does); the root package is lazy and adds none."""
    me = module_name(path) if path.is_relative_to(PACKAGE) else ""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
            targets += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != "gptkit":
                found.add(target)
                parts = target.split(".")
                for i in range(2, len(parts)):
                    package = ".".join(parts[:i])
                    if not me.startswith(package + "."):
                        found.add(package)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    units = {unit_of(m) for m in all_modules()}
    assert units <= set(LAYER_OF), f"modules outside every layer: {sorted(units - set(LAYER_OF))}"


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_runs_up_the_layers():
    upward = [
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if LAYER_OF[unit_of(dst)] > LAYER_OF[unit_of(src)]
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_the_checks_see_a_planted_circle_and_an_upward_edge():
    graph = {"gptkit.a": {"gptkit.b"}, "gptkit.b": {"gptkit.c"}, "gptkit.c": {"gptkit.a"}}
    assert find_cycle(graph) == ["gptkit.a", "gptkit.b", "gptkit.c", "gptkit.a"]
    assert find_cycle({"gptkit.a": {"gptkit.b"}, "gptkit.b": set()}) is None
    # A function-local import counts: the model reaching up into the server would be flagged.
    source = "def f():\n    from gptkit.serve.app import create_app\n"
    tree_edges = imported_modules_from_source(source)
    assert "gptkit.serve.app" in tree_edges and "gptkit.serve" in tree_edges
    assert LAYER_OF[unit_of("gptkit.serve.app")] > LAYER_OF[unit_of("gptkit.model")]


def imported_modules_from_source(source: str) -> set[str]:
    tmp = PACKAGE / "_planted_for_test.py"
    assert not tmp.exists()
    try:
        tmp.write_text(source)
        return imported_modules(tmp, set(all_modules()))
    finally:
        tmp.unlink()


MAX_FUNCTION_LINES = 80


def test_no_function_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_complexity_bound_is_enforced_by_ruff():
    """``ruff check`` (run by CI) enforces C901 at 15 over the package; the setting must stay."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'select = \[[^\]]*"C90"', text), "ruff must select C90 (mccabe)"
    assert re.search(r"max-complexity = 15\b", text)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--quiet", str(PACKAGE)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    if result.returncode != 0 and "No module named ruff" in result.stderr:
        pytest.skip("ruff is not installed")
    assert result.returncode == 0, result.stdout


def test_import_gptkit_stays_light():
    """``import gptkit`` and the torch-free layers load without torch."""
    code = (
        "import sys, gptkit, gptkit.inference, gptkit.spec.files, gptkit.registry.registry\n"
        "gptkit.load; gptkit.hookimpl\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
