"""Hostile records inside data files (issue 26): JSON Lines rows nested too deeply or holding
lone surrogates, Parquet columns that are not text and damaged pages, damaged saved datasets,
records larger than the fitting sample, and files too small to split: each is an exit-2
message naming the file and the problem, or it trains."""

import json
import os

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
GOOD = '{"text": "a fine record of plain text"}\n'


def _prepare(tmp_path, source, *sets, timeout=120):
    env = {"GPTKIT_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--set", f"data.source={json.dumps(str(source))}"]
    for item in sets:
        args += ["--set", item]
    return run_cli("prepare", SMOKE, *args, "--json", env=env, cwd=tmp_path, timeout=timeout)


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_a_jsonl_row_nested_100000_deep_names_the_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(GOOD * 2 + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert_user_error(_prepare(tmp_path, path), "deep.jsonl line 3", "nested too deeply")


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_a_jsonl_row_holding_a_lone_surrogate_names_the_file_and_line(tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_text(GOOD + '{"text": "ok \\u00e9 then \\ud800 alone"}\n')
    assert_user_error(_prepare(tmp_path, path), "sur.jsonl line 2", "lone surrogate")


def _parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)


@pytest.mark.slow  # two subprocesses preparing a corpus: ~5 s on 2 shared cores
def test_parquet_list_and_struct_columns_name_the_column_and_its_type(tmp_path):
    pytest.importorskip("pyarrow")
    _parquet(tmp_path / "lists.parquet", [["a", "b"], ["c"]])
    _parquet(tmp_path / "structs.parquet", [{"body": "a"}, {"body": "b"}])
    assert_user_error(
        _prepare(tmp_path, tmp_path / "lists.parquet"),
        "lists.parquet: field 'text' holds list<",
        "not text",
    )
    assert_user_error(
        _prepare(tmp_path, tmp_path / "structs.parquet"),
        "structs.parquet: field 'text' holds struct<body: string>",
        "not text",
    )


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_a_parquet_file_with_damaged_pages_is_named(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    _parquet(path, [f"row {i} of some text" for i in range(2000)])
    assert pq.ParquetFile(path).metadata.num_rows == 2000  # the footer is intact
    raw = bytearray(path.read_bytes())
    raw[8:200] = b"\xff" * 192  # the first page's header and data
    path.write_bytes(bytes(raw))
    assert_user_error(_prepare(tmp_path, path), "d.parquet is not a readable Parquet file")


def _saved_dataset(path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i} of a saved dataset" for i in range(3000)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(path))
    return next(path.glob("*.arrow"))


@pytest.mark.slow  # a subprocess preparing a corpus: ~4 s on 2 shared cores
def test_a_saved_dataset_whose_state_json_is_a_list_is_named(tmp_path):
    _saved_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "state.json").write_text("[]")
    assert_user_error(_prepare(tmp_path, tmp_path / "ds"), "ds/state.json holds a list")


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_a_saved_dataset_holding_a_fifo_is_refused_not_hung(tmp_path):
    arrow = _saved_dataset(tmp_path / "ds")
    arrow.unlink()
    os.mkfifo(arrow)
    result = _prepare(tmp_path, tmp_path / "ds", timeout=60)
    assert_user_error(result, f"{arrow.name} is a FIFO")


@pytest.mark.slow  # ~110 in-process prepares: ~4 s
def test_a_saved_dataset_with_a_byte_flipped_arrow_file_is_named_or_read(tmp_path):
    """One flipped byte anywhere in the file (every 8th of the first 400: the schema and
    the first batch's header; then a stride over the data): the dataset is read, or refused
    with a DataError naming it, never another error (SystemError, a segmentation fault)."""
    from gptkit.data.prepare import prepare_tokens
    from gptkit.errors import DataError
    from gptkit.spec.validate import validate_spec

    arrow = _saved_dataset(tmp_path / "ds")
    good = arrow.read_bytes()
    spec = validate_spec({"data": {"source": str(tmp_path / "ds")}, "tokenizer": "byte"})
    refused = 0
    for offset in [*range(0, 400, 8), *range(400, len(good), 1499)]:
        flipped = bytearray(good)
        flipped[offset] ^= 0xFF
        arrow.write_bytes(bytes(flipped))
        try:
            prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / f"cache{offset}")
        except DataError as exc:
            assert str(tmp_path / "ds") in str(exc), (offset, exc)
            refused += 1
    assert refused >= 40  # most flips damage it


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_one_record_larger_than_the_fitting_sample_is_fitted_on_and_trains(tmp_path):
    """One JSON Lines record of 3.9 kB with data.fit_sample_bytes=1024 (as a 36 MB record
    with the default 16 MB): the seeded draw skips the only piece, and fitting used to see
    nothing, so every character was dropped and the file was called empty."""
    text = " ".join(f"word{i % 500}" for i in range(500))
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    result = _prepare(tmp_path, path, "data.fit_sample_bytes=1024")
    assert result.returncode == 0, result.stderr
    assert "dropped" not in result.stderr  # the sample holds every character of the record
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["tokens"] == len(text) and out["documents"] == 1


@pytest.mark.slow  # a subprocess preparing a corpus: ~3 s on 2 shared cores
def test_a_one_byte_file_is_too_small_to_split_not_empty(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x")
    result = _prepare(tmp_path, path)
    assert_user_error(result, "the training part of data.source has 0 tokens")
    assert "empty" not in result.stderr
