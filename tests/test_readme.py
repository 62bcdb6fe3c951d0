"""Every Python block in the README runs as written (against a small trained run)."""

import re
import shutil
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # every test here trains, serves or spawns the CLI


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_blocks_run_as_written(smoke_run, tmp_path, monkeypatch, capsys):
    # The folders the README's examples name: a run, a bundle, the experiments.
    shutil.copytree(smoke_run, tmp_path / "runs" / "shakespeare-char" / "20260101-000000")
    exported = run_cli(
        "export", smoke_run, "--out", tmp_path / "bundles" / "shakespeare", cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespaces = []
    for block in blocks:
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w]+\.py", first):  # a file the reader is meant to create
            (tmp_path / first[2:]).write_text(block)
            continue
        ns: dict = {"__name__": "readme"}
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
        namespaces.append(ns)
    out = capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "quickstart" / "checkpoints" / "latest").exists()
    batch = [line for line in out.splitlines() if re.fullmatch(r"\[['\"].*['\"]\]", line)]
    assert batch and len(eval(batch[0])) == 2  # noqa: S307 - the repr of the two continuations
    # The plugin author's test, defined by the README, passes every property for one pair
    # (ONNX export included).
    ns = next(ns for ns in namespaces if "test_my_attention" in ns)
    cases = [c for c in ns["contract_cases"](["my_attention"], kinds=("mqa",), pairs=True)]
    rope = [c.values[0] for c in cases if c.values[0].partner == "rope"]
    assert {c.prop for c in rope} == set(
        ns["contract_cases"].__globals__["PROPERTIES"]["attention"]
    )
    for i, case in enumerate(rope):
        ns["test_my_attention"](case, tmp_path / f"case-{i}")
    sys.modules.pop("my_attention", None)


def _guarantee_rows():
    text = (ROOT / "README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    return [line for line in text.splitlines() if line.startswith("| ") and "`" in line]


def test_every_guarantee_names_tests_that_exist():
    """Each ``file.py::test`` (and ``::test``, of the file before it) in the Guarantees table
    is a test function in that file, and each named file exists."""
    rows = _guarantee_rows()
    assert len(rows) >= 10, rows
    missing = []
    for row in rows:
        tests_cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        current = None
        for ref in re.findall(r"`([^`]+)`", tests_cell):
            path, _, name = ref.partition("::")
            if path:
                if not path.endswith(".py"):
                    continue  # a command or a field name, not a test
                current = ROOT / "tests" / path.removeprefix("tests/")
                if not current.is_file():
                    missing.append(ref)
                    continue
            name = name.split("[")[0]
            if name and (current is None or f"def {name}(" not in current.read_text()):
                missing.append(ref)
    assert not missing, f"the Guarantees table names tests that do not exist: {missing}"
