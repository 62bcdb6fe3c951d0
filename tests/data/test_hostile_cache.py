"""A token cache tampered with between `gptkit prepare` and its next use (issue 26): a FIFO
as meta.json, counts that do not add up, GPTKIT_CACHE_DIR naming a file. A damaged entry is
rebuilt (it is gptkit's own, derived from the sources); nothing hangs."""

import json
import os

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


def _prepare(cache, cwd):
    return run_cli(
        "prepare",
        SMOKE,
        "--json",
        "--no-progress",
        env={"GPTKIT_CACHE_DIR": cache},
        cwd=cwd,
        timeout=60,
    )


def _poke_id(meta_file, good):
    """Write an id past the vocabulary into the middle of the first shard."""
    shard = meta_file.parent / good["shards"][0]["file"]
    dtype = np.dtype(good["dtype"])
    ids = np.memmap(shard, dtype=dtype, mode="r+", offset=256 * 4)
    ids[len(ids) // 2] = good["vocab_size"] + 3
    ids.flush()
    del ids


@pytest.mark.slow
def test_a_damaged_cache_entry_is_rebuilt_never_read_blindly(tmp_path):
    cache = tmp_path / "cache"
    first = _prepare(cache, tmp_path)
    assert first.returncode == 0, first.stderr
    (meta_file,) = cache.glob("tokens/*/meta.json")
    good = json.loads(meta_file.read_text())
    damages = [
        lambda: os.mkfifo(meta_file),
        lambda: meta_file.write_text(json.dumps({**good, "tokens": "many"})),
        lambda: meta_file.write_text(json.dumps({**good, "tokens": good["tokens"] * 10})),
        lambda: (meta_file.write_text(json.dumps(good)), _poke_id(meta_file, good)),
    ]
    for damage in damages:
        meta_file.unlink()
        damage()
        again = _prepare(cache, tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["tokens"] == good["tokens"]
        assert json.loads(meta_file.read_text())["tokens"] == good["tokens"]  # rebuilt
        shard = meta_file.parent / good["shards"][0]["file"]
        ids = np.memmap(shard, dtype=np.dtype(good["dtype"]), mode="r", offset=256 * 4)
        assert int(ids.max()) < good["vocab_size"]
    shard = meta_file.parent / good["shards"][0]["file"]
    shard.unlink()
    os.mkfifo(shard)  # np.fromfile would wait on it forever
    again = _prepare(cache, tmp_path)
    assert again.returncode == 0, again.stderr
    assert shard.is_file() and json.loads(again.stdout)["tokens"] == good["tokens"]  # rebuilt


@pytest.mark.slow  # a subprocess importing the spec layer: ~3 s on 2 shared cores
def test_a_cache_dir_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _prepare(tmp_path / "file", tmp_path)
    assert_user_error(result, "is not a folder", "GPTKIT_CACHE_DIR")
