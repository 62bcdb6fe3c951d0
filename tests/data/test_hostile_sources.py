"""Hostile data.source values (issue 26): globs over folders that link to themselves end,
walks are bounded, and files that cannot be read are named in an exit-2 message."""

import json
import os

import pytest

from gptkit.data.sources import resolve_sources
from gptkit.errors import DataError
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


def _looping_folder(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "x.txt").write_text("to be or not to be, that is the question. " * 60)
    (d / "sub" / "y.txt").write_text("whether tis nobler in the mind to suffer. " * 60)
    (d / "sub" / "z.md").write_text("not matched")
    os.symlink(".", d / "a")
    os.symlink(".", d / "b")
    os.symlink("..", d / "sub" / "up")
    return d


def test_a_glob_over_a_folder_linking_to_itself_ends(tmp_path, monkeypatch):
    _looping_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    names = [s.name for s in resolve_sources("d/**/*.txt")]
    assert names == ["d/sub/y.txt", "d/x.txt"]  # each file once, through no link
    assert [s.name for s in resolve_sources("d/*.txt")] == ["d/x.txt"]  # * is one level
    assert [s.name for s in resolve_sources("d")] == ["d/sub/y.txt", "d/sub/z.md", "d/x.txt"]


def test_a_walk_past_the_file_limit_is_refused(tmp_path):
    from gptkit.safeio import walk_files

    for i in range(12):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert len(walk_files(tmp_path, limit=12)) == 12
    with pytest.raises(DataError, match="more than 10 files"):
        walk_files(tmp_path, limit=10, error=DataError)


@pytest.mark.slow  # two subprocesses preparing a corpus: ~5 s on 2 shared cores
def test_prepare_over_looping_links_and_proc_files(tmp_path):
    d = _looping_folder(tmp_path)
    env = {"GPTKIT_CACHE_DIR": str(tmp_path / "cache")}
    source = f"data.source={json.dumps(str(d / '**' / '*.txt'))}"
    result = run_cli("prepare", SMOKE, "--set", source, "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source_bytes"] == 2 * 42 * 60  # each file once
    proc = run_cli("prepare", SMOKE, "--set", 'data.source="/proc/self/*"', env=env, timeout=60)
    assert_user_error(proc, "cannot read data file /proc/self/")
