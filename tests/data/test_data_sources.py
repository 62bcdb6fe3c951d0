"""Data at scale: every source kind, bad input of each kind, shards, the cache's atomicity,
and memory that does not grow with the corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptkit.data.prepare import prepare_tokens
from gptkit.data.shards import TokenArray
from gptkit.data.sources import load_corpus
from gptkit.errors import DataError
from gptkit.spec.validate import validate_spec
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
DOCS = [
    "First document.\nIt has two lines.\n",
    "Second: café, naïve, 東京.",
    "third " * 40,
    "Fourth and last.",
]
EOT = 256  # the byte tokenizer's end-of-text id


def expected_ids(docs):
    """Bytes of each document, the end-of-text id between documents."""
    out = []
    for i, doc in enumerate(docs):
        if i:
            out.append(EOT)
        out += list(doc.encode("utf-8"))
    return np.array(out)


def make_source(kind, root):
    """Write DOCS as a source of ``kind`` under ``root``; return (data fields, docs in order)."""
    if kind == "text":
        (root / "one.txt").write_text("".join(DOCS))
        return {"source": str(root / "one.txt")}, ["".join(DOCS)]
    if kind in ("list", "glob", "folder"):
        (root / "sub").mkdir()
        names = ["a.txt", "b.txt", "sub/c.txt", "sub/d.txt"]
        for name, doc in zip(names, DOCS):
            (root / name).write_text(doc)
        if kind == "list":
            return {"source": [str(root / n) for n in names]}, DOCS
        if kind == "glob":
            return {"source": str(root / "**" / "*.txt")}, DOCS
        return {"source": str(root)}, DOCS
    if kind == "jsonl":
        lines = [json.dumps({"id": i, "content": d}) for i, d in enumerate(DOCS)]
        (root / "d.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
        return {"source": str(root / "d.jsonl"), "field": "content"}, DOCS
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"text": DOCS, "n": list(range(4))}), root / "d.parquet", row_group_size=2
        )
        return {"source": str(root / "d.parquet")}, DOCS
    if kind in ("hf", "hf_dict"):
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(4))})
        if kind == "hf_dict":
            other = datasets.Dataset.from_dict({"text": ["not this"], "n": [0]})
            datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(root / "ds"))
        else:
            ds.save_to_disk(str(root / "ds"))
        return {"source": str(root / "ds")}, DOCS
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["text", "list", "glob", "folder", "jsonl", "parquet", "hf", "hf_dict"]
)
def test_each_source_kind_becomes_documents_separated_by_end_of_text(tmp_path, kind):
    fields, docs = make_source(kind, tmp_path)
    spec = validate_spec({"data": {**fields, "val_fraction": 0.25}, "tokenizer": "byte"})
    data = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    ids = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert np.array_equal(ids, expected_ids(docs))
    assert data.meta["documents"] == len(docs)
    assert len(data.val) == len(ids) - int(len(ids) * 0.75)
    assert data.tokenizer.decode(ids[ids != EOT].tolist()) == "".join(docs)


def test_text_larger_than_a_piece_is_one_document(tmp_path, monkeypatch):
    import gptkit.data.sources as data_mod

    monkeypatch.setattr(data_mod, "PIECE_BYTES", 64)  # many pieces, cut inside lines too
    text = "line of text, naïve café\n" * 20 + "x" * 300 + "東京" * 50
    (tmp_path / "a.txt").write_text(text)
    spec = validate_spec({"data": {"source": str(tmp_path / "a.txt")}, "tokenizer": "char"})
    data = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    ids = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert data.tokenizer.eot_id not in ids.tolist()  # no separator inside a document
    assert data.tokenizer.decode(ids.tolist()) == text


def _bad_sources(root, case):
    """Write one kind of bad input; return (data fields, words the message must hold)."""
    pq = pa = None
    if case.startswith("parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
    if case == "jsonl_missing_field":
        (root / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text here"}\n')
        return {"source": str(root / "d.jsonl")}, ["d.jsonl line 2", "no field 'text'", "body"]
    if case == "jsonl_bad_json":
        (root / "d.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
        return {"source": str(root / "d.jsonl")}, ["d.jsonl line 2", "not valid JSON"]
    if case == "jsonl_not_text":
        (root / "d.jsonl").write_text('{"text": 12}\n')
        return {"source": str(root / "d.jsonl")}, ["line 1", "'text' is int, not text"]
    if case == "jsonl_empty":
        (root / "good.jsonl").write_text('{"text": "fine"}\n')
        (root / "empty.jsonl").write_text("\n\n")
        return {"source": str(root / "*.jsonl")}, ["empty.jsonl is empty"]
    if case == "text_empty_shard":
        (root / "a.txt").write_text("some text " * 50)
        (root / "b.txt").write_text("")
        return {"source": str(root / "*.txt")}, ["b.txt is empty"]
    if case == "text_mixed_encodings":
        (root / "a.txt").write_bytes("naïve café ".encode() * 100 + "naïve".encode("latin-1"))
        return {"source": str(root / "a.txt")}, ["a.txt is not UTF-8", "offset 1302"]
    if case == "text_missing_file":
        (root / "a.txt").write_text("some text " * 50)
        return {"source": [str(root / "a.txt"), str(root / "gone.txt")]}, ["not found", "gone.txt"]
    if case == "parquet_missing_column":
        pq.write_table(pa.table({"body": ["x"]}), root / "d.parquet")
        return {"source": str(root / "d.parquet")}, ["d.parquet", "no field 'text'", "body"]
    if case == "parquet_empty":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "d.parquet")
        return {"source": str(root / "d.parquet")}, ["d.parquet is empty"]
    if case == "parquet_corrupt":
        (root / "d.parquet").write_bytes(b"PAR1 this is not parquet at all")
        return {"source": str(root / "d.parquet")}, ["d.parquet is not a readable Parquet file"]
    if case == "hf_missing_column":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(root / "ds"))
        return {"source": str(root / "ds")}, ["ds: no field 'text'", "body"]
    if case == "hf_empty":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"text": []}).save_to_disk(str(root / "ds"))
        return {"source": str(root / "ds")}, ["ds is empty"]
    raise AssertionError(case)


BAD = [
    "jsonl_missing_field",
    "jsonl_bad_json",
    "jsonl_not_text",
    "jsonl_empty",
    "text_empty_shard",
    "text_mixed_encodings",
    "text_missing_file",
    "parquet_missing_column",
    "parquet_empty",
    "parquet_corrupt",
    "hf_missing_column",
    "hf_empty",
]


def _no_valid_cache(cache):
    tokens = cache / "tokens"
    return not tokens.exists() or not any(tokens.rglob("meta.json")) and not any(tokens.iterdir())


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_file_and_leaves_no_cache(tmp_path, case):
    fields, needles = _bad_sources(tmp_path, case)
    spec = validate_spec({"data": fields, "tokenizer": "byte"})
    with pytest.raises(DataError) as info:
        prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    for needle in needles:
        assert needle in str(info.value)
    assert _no_valid_cache(tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["jsonl_missing_field", "text_mixed_encodings", "parquet_empty", "hf_missing_column"]
)
def test_bad_input_exits_2_from_prepare(tmp_path, case):
    fields, needles = _bad_sources(tmp_path, case)
    sets = [x for k, v in fields.items() for x in ("--set", f"data.{k}={v}")]
    result = run_cli(
        "prepare", SMOKE, *sets, env={"GPTKIT_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path
    )
    assert_user_error(result, *needles)
    assert _no_valid_cache(tmp_path / "cache")


def test_shards_read_as_one_array(tmp_path):
    text = load_corpus("tinyshakespeare")[:20_000]
    (tmp_path / "a.txt").write_text(text)
    spec = validate_spec(
        {"data": {"source": str(tmp_path / "a.txt"), "shard_tokens": 3000}, "tokenizer": "byte"}
    )
    data = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    flat = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)
    assert len(data.meta["shards"]) == 7 and data.train.dtype == np.uint16
    whole = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert np.array_equal(whole, flat)
    # The trainer's batch indexing, across shard boundaries, in both parts.
    rng = np.random.default_rng(0)
    for part, offset in ((data.train, 0), (data.val, len(data.train))):
        starts = rng.integers(0, len(part) - 65, size=32)
        windows = part[starts[:, None] + np.arange(65)]
        assert np.array_equal(windows, flat[offset + starts[:, None] + np.arange(65)])
        assert np.array_equal(part[100:4000], flat[offset + 100 : offset + 4000])
        assert part[-1] == flat[offset + len(part) - 1]
    with pytest.raises(IndexError):
        data.val[np.array([len(data.val)])]
    # Each shard is an llm.c/nanoGPT .bin: 256 int32 header, then uint16 ids.
    raw = np.fromfile(data.folder / "shard-00001.bin", dtype=np.int32, count=3)
    assert raw.tolist() == [20240520, 1, 3000]


def test_token_array_over_memmaps_matches_numpy():
    parts = [
        np.arange(0, 5, dtype=np.uint16),
        np.arange(5, 12, dtype=np.uint16),
        np.arange(12, 13, dtype=np.uint16),
    ]
    arr = TokenArray(parts, 2, 12)
    assert len(arr) == 10 and arr[0] == 2 and arr[-1] == 11
    assert np.array_equal(arr[np.array([[0, 3], [4, 9]])], [[2, 5], [6, 11]])
    assert np.array_equal(arr[2:7], np.arange(4, 9)) and np.array_equal(arr[::3], [2, 5, 8, 11])
    assert np.array_equal(np.asarray(arr, dtype=np.int64), np.arange(2, 12))


def test_damaged_cache_is_rebuilt_and_a_second_run_reuses(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 500)
    spec = validate_spec({"data": {"source": str(tmp_path / "a.txt")}})
    first = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    assert not first.cached
    assert prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache").cached
    shard = first.folder / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # cut short, as by a crash
    again = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    assert not again.cached and np.array_equal(np.asarray(again.train), np.asarray(first.train))
    # A build killed midway leaves a temporary folder; the next build of the entry removes it.
    import shutil

    shutil.rmtree(again.folder)
    stale = again.folder.with_name(f".tmp-{again.folder.name}-999999999-1")
    stale.mkdir()
    (stale / "shard-00000.bin").write_bytes(b"partial")
    assert not prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache").cached
    assert not stale.exists()
    # New content is a new entry.
    (tmp_path / "a.txt").write_text("hello world\n" * 501)
    assert not prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache").cached


def test_fitting_sees_a_bounded_seeded_sample(tmp_path):
    from gptkit.data.encode import fit_sample
    from gptkit.data.sources import resolve_sources

    # 40 files of 4 KB, each with its own rare letter; a 20 KB sample cannot see all of them.
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text((chr(0x3B1 + i % 24) + "ab\n") * 1000)
    spec = validate_spec({"data": {"source": str(tmp_path / "*.txt"), "fit_sample_bytes": 20_000}})
    sources = resolve_sources(spec.data.source)
    sample = fit_sample(sources, spec.data)
    assert 0 < len(sample.encode()) <= 20_000 + 4 * len(sources)
    assert sample == fit_sample(sources, spec.data)  # seeded: the same every time
    other = spec.data.model_copy(update={"fit_seed": 1})
    assert fit_sample(sources, other) != sample


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from gptkit.cli import main
sys.argv = ["gptkit", "prepare", sys.argv[1], "--set", f"data.source={sys.argv[2]}",
            "--set", "tokenizer=byte"]
main()
"""


@pytest.mark.slow
def test_a_failed_write_leaves_nothing_that_looks_like_a_cache(tmp_path):
    (tmp_path / "a.txt").write_text(load_corpus("tinyshakespeare")[:400_000])
    env = {**os.environ, "GPTKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(SMOKE), str(tmp_path / "a.txt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert_user_error(result, "could not write the token cache", "nothing was kept")
    leftovers = list((tmp_path / "cache" / "tokens").iterdir())
    assert leftovers == [], leftovers
    # With room, the same command succeeds and a second one reuses what it wrote.
    first = run_cli(
        "prepare",
        SMOKE,
        "--set",
        f"data.source={tmp_path / 'a.txt'}",
        "--set",
        "tokenizer=byte",
        env={"GPTKIT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert first.returncode == 0, first.stderr
    assert "shard-00000.bin" in first.stdout and "tokenized in" in first.stdout
    second = run_cli(
        "prepare",
        SMOKE,
        "--set",
        f"data.source={tmp_path / 'a.txt'}",
        "--set",
        "tokenizer=byte",
        env={"GPTKIT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert "reused the cache" in second.stdout


PEAK_RSS = r"""
import resource, sys
from gptkit.data.prepare import prepare_tokens
from gptkit.spec.validate import validate_spec
spec = validate_spec({"data": {"source": sys.argv[1], "shard_tokens": 4_000_000},
                      "tokenizer": sys.argv[2]})
data = prepare_tokens(spec.data, spec.tokenizer, workers=1, progress=False)
print(len(data.train) + len(data.val), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _prepare_peak_kb(path, tokenizer, cache):
    env = {**os.environ, "GPTKIT_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path), tokenizer],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.slow
def test_corpus_larger_than_the_memory_bound_is_prepared_and_trained_on(tmp_path):
    """The corpus is 48 MB; preparing it may use at most 24 MB more than preparing 1 MB (the
    old whole-text path used ~11x the corpus), and training then runs from the shards."""
    text = load_corpus("tinyshakespeare")
    (tmp_path / "small.txt").write_text(text)
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(43):
            f.write(text)
    big_mb = (tmp_path / "big.txt").stat().st_size / 1e6
    assert big_mb > 47
    for tokenizer in ("char", "byte"):
        n_small, small_kb = _prepare_peak_kb(tmp_path / "small.txt", tokenizer, tmp_path / "c")
        n_big, big_kb = _prepare_peak_kb(tmp_path / "big.txt", tokenizer, tmp_path / "c")
        assert n_big == 43 * n_small
        growth_mb = (big_kb - small_kb) / 1024
        assert growth_mb < 24 < big_mb, (tokenizer, small_kb, big_kb)
    result = run_cli(
        "train",
        SMOKE,
        "--set",
        f"data.source={tmp_path / 'big.txt'}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "tracking.enabled=false",
        "--run-dir",
        tmp_path / "run",
        "--no-progress",
        env={"GPTKIT_CACHE_DIR": str(tmp_path / "c")},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"{int(len(text) * 43 * 0.9):,} train" in result.stdout  # all 48 MB, from the cache
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
