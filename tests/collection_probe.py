"""A pytest plugin for ``pytest --collect-only -p tests.collection_probe``: prints each
collected test id with the reason it would always skip here, if any (a skip mark that holds
in this environment, a ``pytest.skip`` call that no condition guards, an ``importorskip`` of
a module that is not installed). tests/test_readme.py uses it on the Guarantees table's tests.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import textwrap
from typing import Any

import pytest
from _pytest.skipping import evaluate_skip_marks

GUARDS = (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.With, ast.BoolOp, ast.Match)


def _skip_calls(tree: ast.AST) -> list[tuple[str, ast.Call, bool]]:
    """(what, call, guarded) for each ``pytest.skip`` / ``importorskip`` call in ``tree``;
    guarded: under a condition, loop, try or with (it may not run)."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("skip", "importorskip"):
                found.append((node.func.attr, node, guarded))
        for child in ast.iter_child_nodes(node):
            inner = isinstance(child, (ast.FunctionDef, ast.Lambda))  # runs only if called
            visit(child, guarded or isinstance(node, GUARDS) or inner)

    for statement in getattr(tree, "body", []):
        visit(statement, False)
    return found


def always_skips(item: Any) -> str | None:
    """Why ``item`` would be skipped every time it runs here, or None."""
    skip = evaluate_skip_marks(item)
    if skip is not None:
        return f"skip mark: {skip.reason}"
    function = getattr(item, "function", None)
    if function is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    for what, call, guarded in _skip_calls(tree):
        if what == "skip" and not guarded:
            return "calls pytest.skip unconditionally"
        if what == "importorskip" and call.args and isinstance(call.args[0], ast.Constant):
            module = str(call.args[0].value)
            try:
                missing = importlib.util.find_spec(module) is None
            except ModuleNotFoundError:
                missing = True
            if missing:
                return f"needs {module}, not installed here"
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: Any) -> None:
    for item in session.items:
        print("PROBE " + json.dumps([item.nodeid, always_skips(item)]))
