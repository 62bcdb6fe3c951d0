"""Every Python block in the README runs as written (against a small trained run)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from gptkit.bench.serve import running_server
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
    namespaces, clients = [], 0
    for block in blocks:
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w]+\.py", first):  # a file the reader is meant to create
            (tmp_path / first[2:]).write_text(block)
            continue
        ns: dict = {"__name__": "readme"}
        if "http://127.0.0.1:8000" in block:  # a client of the `gptkit serve` the README starts
            with running_server(
                tmp_path / "bundles" / "shakespeare", "--served-model-name", "shakespeare-char"
            ) as url:
                served = block.replace("http://127.0.0.1:8000", url)
                exec(compile(served, "README.md", "exec"), ns)  # noqa: S102
            clients += 1
            continue
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
        namespaces.append(ns)
    assert clients == 1  # the OpenAI client's example ran against a real server
    out = capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "quickstart" / "checkpoints" / "latest").exists()
    batch = [line for line in out.splitlines() if re.fullmatch(r"\[['\"].*['\"]\]", line)]
    assert batch and len(eval(batch[0])) == 2  # noqa: S307 - the repr of the two continuations
    # The plugin author's test, defined by the README, passes every property for one pair
    # (ONNX export included).
    ns = next(ns for ns in namespaces if "test_my_attention" in ns)
    cases = [c for c in ns["contract_cases"](["my_attention"], kinds=("mqa",), pairs=True)]
    # every property with rope, and positional_weights (paired with learned by design)
    rope = [c.values[0] for c in cases if c.values[0].partner == "rope"]
    rope += [c.values[0] for c in cases if c.values[0].prop == "positional_weights"]
    assert {c.prop for c in rope} == set(
        ns["contract_cases"].__globals__["PROPERTIES"]["attention"]
    )
    for i, case in enumerate(rope):
        ns["test_my_attention"](case, tmp_path / f"case-{i}")
    sys.modules.pop("my_attention", None)


def _guarantee_rows():
    text = (ROOT / "README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    return [line for line in text.splitlines() if line.startswith("| ") and "`" in line]


def _guarantee_refs():
    """(reference, test file, test name or None for the whole file) for each test the
    Guarantees table names: ``file.py::test``, ``::test`` (of the file before it), ``file.py``."""
    refs = []
    for row in _guarantee_rows():
        tests_cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        current = None
        for ref in re.findall(r"`([^`]+)`", tests_cell):
            path, _, name = ref.partition("::")
            if path:
                if not path.endswith(".py"):
                    continue  # a command or a field name, not a test
                current = ROOT / "tests" / path.removeprefix("tests/")
            refs.append((ref, current, name.split("[")[0] or None))
    return refs


def test_every_guarantee_names_tests_that_exist():
    """Each ``file.py::test`` (and ``::test``, of the file before it) in the Guarantees table
    is a test function in that file, and each named file exists."""
    assert len(_guarantee_rows()) >= 10
    missing = []
    for ref, path, name in _guarantee_refs():
        if path is None or not path.is_file():
            missing.append(ref)
        elif name and f"def {name}(" not in path.read_text():
            missing.append(ref)
    assert not missing, f"the Guarantees table names tests that do not exist: {missing}"


def probe(*paths, cwd=ROOT):
    """{test id: why it would always skip here, or None} for the tests pytest collects from
    ``paths`` (tests/collection_probe.py)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"]
        + ["-p", "no:cacheprovider", "-p", "tests.collection_probe", *map(str, paths)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [line[6:] for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines or result.returncode == 5, result.stdout[-3000:] + result.stderr[-3000:]
    return dict(json.loads(line) for line in lines)


def test_every_guarantee_test_is_collected_and_does_not_always_skip():
    """The tests each row names are collected by pytest (a module-level skip or a failed
    import collects none) and none of them skips every time here: no skip mark that holds,
    no unguarded pytest.skip, no importorskip of a module that is missing."""
    refs = _guarantee_refs()
    collected = probe(*sorted({path.relative_to(ROOT) for _, path, _ in refs}))
    problems = []
    for ref, path, name in refs:
        prefix = f"{path.relative_to(ROOT).as_posix()}::"
        ids = [i for i in collected if i.startswith(prefix)]
        if name:
            ids = [i for i in ids if i[len(prefix) :].split("[")[0] == name]
        if not ids:
            problems.append(f"{ref}: not collected")
        problems += [f"{i}: {collected[i]}" for i in ids if collected[i]]
    problems = list(dict.fromkeys(problems))  # a file named whole and by test
    assert not problems, "Guarantees tests that do not run:\n" + "\n".join(problems)


def test_the_probe_finds_tests_that_always_skip(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import sys\n"
        "import pytest\n\n"
        "@pytest.mark.skip(reason='later')\n"
        "def test_marked(): pass\n\n"
        "@pytest.mark.skipif(sys.version_info > (3,), reason='py3')\n"
        "def test_skipif_true(): pass\n\n"
        "def test_body_skip():\n"
        "    pytest.skip('not yet')\n\n"
        "def test_missing_module():\n"
        "    pytest.importorskip('no_such_module_for_gptkit')\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_conditional(x):\n"
        "    if x == 2:\n"
        "        pytest.skip('two')\n\n"
        "def test_installed():\n"
        "    pytest.importorskip('numpy')\n"
    )
    found = probe(tmp_path / "test_skips.py", cwd=tmp_path)
    reasons = {i.split("::")[1]: r for i, r in found.items()}
    assert reasons == {
        "test_marked": "skip mark: later",
        "test_skipif_true": "skip mark: py3",
        "test_body_skip": "calls pytest.skip unconditionally",
        "test_missing_module": "needs no_such_module_for_gptkit, not installed here",
        "test_conditional[1]": None,
        "test_conditional[2]": None,
        "test_installed": None,
    }
    (tmp_path / "test_skipped_module.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_for_gptkit')\n"
        "def test_never_collected(): pass\n"
    )
    assert probe(tmp_path / "test_skipped_module.py", cwd=tmp_path) == {}
