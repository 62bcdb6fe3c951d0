"""Data: the embedded corpus, sources, the split, the token cache, bad data."""

import numpy as np
import pytest

from gptkit.data.prepare import prepare_tokens
from gptkit.data.sources import load_corpus, load_text, split_text
from gptkit.errors import DataError
from gptkit.spec.validate import validate_spec
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli


def test_embedded_corpus_is_tiny_shakespeare():
    text = load_corpus("tinyshakespeare")
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:")


def test_split_is_by_position_last_part_validation():
    train, val = split_text("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")


def test_sources_file_list_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "b.txt").write_text("world")
    assert load_text(str(tmp_path / "a.txt")) == "hello "
    assert load_text([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == "hello \nworld"
    assert load_text(str(tmp_path / "*.txt")) == "hello \nworld"


def test_tokenizer_is_fitted_on_training_part_and_cache_is_reused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab" * 450 + "abx" * 33 + "a")  # 'x' only in the last 10% of the bytes
    spec = validate_spec({"data": {"source": str(path)}})
    first = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    assert first.tokenizer.chars == ["a", "b"]
    assert first.train.dtype == np.uint16 and not first.cached
    # The unseen 'x' is dropped (and counted); the last 10% of the 967 ids are validation.
    assert first.meta["dropped_characters"] == 33
    assert len(first.train) == 870 and len(first.val) == 97
    second = prepare_tokens(spec.data, spec.tokenizer, cache=tmp_path / "cache")
    assert second.cached
    assert np.array_equal(np.asarray(first.train), np.asarray(second.train))
    # A different tokenizer is a different cache entry.
    byte_spec = validate_spec({"data": {"source": str(path)}, "tokenizer": "byte"})
    third = prepare_tokens(byte_spec.data, byte_spec.tokenizer, cache=tmp_path / "cache")
    assert not third.cached and third.tokenizer.vocab_size == 257
    # A chat template does not change the ids: the same entry, with this spec's template.
    chat = validate_spec(
        {"data": {"source": str(path)}, "tokenizer": {"kind": "char", "chat_template": "{{ 1 }}"}}
    )
    fourth = prepare_tokens(chat.data, chat.tokenizer, cache=tmp_path / "cache")
    assert fourth.cached and fourth.tokenizer.chat_template == "{{ 1 }}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda d: None, "data.source file not found"),
        (lambda d: (d / "data.txt").write_text(""), "is empty"),
        (lambda d: (d / "data.txt").write_bytes(b"\x00\x01\x02binary" * 100), "looks binary"),
        (lambda d: (d / "data.txt").write_bytes("caf\xe9".encode("latin-1") * 100), "not UTF-8"),
        (lambda d: (d / "data.txt").write_text("short text"), "tokens; it needs more than"),
        (lambda d: (d / "data.txt").mkdir(), "holds no files"),
    ],
)
def test_bad_data_exits_2_with_a_clear_message(tmp_path, setup, needle):
    setup(tmp_path)
    result = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--no-progress",
        "--set",
        f"data.source={tmp_path / 'data.txt'}",
        cwd=tmp_path,
    )
    assert_user_error(result, needle)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        load_text(str(tmp_path / "*.txt"))
