"""Every code block in docs/plugins.md runs: each plugin example passes gptkit's contract."""

import atexit
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DOC = ROOT / "docs" / "plugins.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), flags=re.S)
MARKER = re.compile(r"#\s*(docs_\w+)(?::\s*(.*))?")


def _marker(code):
    first = code.splitlines()[0]
    m = MARKER.match(first)
    return (m.group(1), (m.group(2) or "").split()) if m else (None, [])


# The plugin examples become importable modules (collection time: cases are built from them).
MODULES = Path(tempfile.mkdtemp(prefix="gptkit-docs-plugins-"))
atexit.register(shutil.rmtree, MODULES, True)  # made at collection time: gone when pytest ends
PLUGINS = []
for lang, code in BLOCKS:
    tag, args = _marker(code)
    if lang == "python" and tag == "docs_plugin":
        (MODULES / f"{args[0]}.py").write_text(code)
        PLUGINS.append(args[0])
sys.path.insert(0, str(MODULES))


def _cases():
    import os

    from gptkit.testing import contract_cases

    os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    try:
        return [c for name in PLUGINS for c in contract_cases([name], provider=name)]
    finally:
        del os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"]


def test_every_block_is_of_a_kind_this_file_runs():
    kinds = [(lang, _marker(code)[0]) for lang, code in BLOCKS]
    assert kinds[0] == ("python", None)  # the import example
    allowed = {
        ("python", "docs_plugin"),
        ("yaml", "docs_spec"),
        ("python", "docs_test"),
        ("toml", "docs_pyproject"),
    }
    assert set(kinds[1:]) <= allowed, kinds
    assert len(PLUGINS) == 5


def test_the_import_example_prints_what_it_says(capsys):
    code = BLOCKS[0][1]
    exec(compile(code, str(DOC), "exec"), {})
    expected = re.search(r"# (\[.*\])", code).group(1)
    assert capsys.readouterr().out.strip() == expected


def test_the_examples_cover_every_slot():
    slots = {c.values[0].slot for c in _cases()}
    assert slots == {"attention", "positional", "tokenizer", "sampler", "optimizer"}


@pytest.mark.parametrize("case", _cases())
def test_doc_example_contract(case, tmp_path):
    from gptkit.testing import run_contract

    run_contract(case, tmp_path)


def test_the_spec_example_validates_with_the_examples():
    from gptkit.spec.validate import validate_spec

    specs = [code for lang, code in BLOCKS if lang == "yaml"]
    assert specs
    for code in specs:
        spec = validate_spec(yaml.safe_load(code), "docs/plugins.md")
        assert spec.model.attention.kind == "scaled" and spec.sampler.kind == "cooling"
        assert spec.train.optimizer.kind == "signsgd"


def test_the_pytest_example_runs(tmp_path):
    from gptkit.testing import Case

    code = next(code for lang, code in BLOCKS if _marker(code)[0] == "docs_test")
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    namespace["test_contract"](Case("sampler", "cooling", "seeded", ("docs_sampler",)), tmp_path)


def test_the_pyproject_example_declares_the_entry_point_group():
    code = next(code for lang, code in BLOCKS if lang == "toml")
    data = tomllib.loads(code)
    assert data["project"]["entry-points"]["gptkit"] == {"myplugins": "gptkit_myplugins"}
