"""Tokenizers: each kind fits, round-trips, saves and loads (without torch), and trains
end to end."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptkit.components.tokenizers import load_tokenizer
from gptkit.data.sources import load_corpus
from gptkit.errors import DataError
from gptkit.registry.registry import load_registry
from tests.conftest import ROOT
from tests.helpers import run_cli

CORPUS = load_corpus("tinyshakespeare")[:60_000]


def make(kind, **fields):
    return load_registry().get("tokenizer", kind).model_validate({"kind": kind, **fields}).build()


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory):
    """A local tokenizer.json (a small byte-level BPE trained here; nothing is downloaded)."""
    tok = make("bpe", vocab_size=300)
    tok.fit(CORPUS)
    folder = tmp_path_factory.mktemp("pretrained")
    tok.save(folder)
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def fitted(hf_tokenizer_json):
    tokenizers = {
        "char": make("char"),
        "byte": make("byte"),
        "bpe": make("bpe", vocab_size=400),
        "sentencepiece": make("sentencepiece", vocab_size=400),
        "pretrained": make("pretrained", path=str(hf_tokenizer_json)),
    }
    for tok in tokenizers.values():
        tok.fit(CORPUS)
    return tokenizers


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece", "pretrained"])
def test_fit_encode_decode_save_load(kind, fitted, tmp_path):
    tok = fitted[kind]
    text = "ROMEO:\nWhat light through yonder window breaks?\n\n  It is the east."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 <= tok.eot_id < tok.vocab_size and max(ids) < tok.vocab_size
    assert tok.decode([*ids, tok.eot_id]) == text  # special tokens are not text
    if kind in ("bpe", "sentencepiece"):
        assert len(ids) < len(text) * 0.8  # merges learned from the corpus
    files = tok.save(tmp_path / "t")
    loaded = load_tokenizer(tmp_path / "t")
    assert loaded.encode(text) == ids and loaded.vocab_size == tok.vocab_size
    assert all((tmp_path / "t" / f).is_file() for f in files)


@pytest.mark.parametrize("kind", ["byte", "bpe", "sentencepiece"])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_byte_level_tokenizers_round_trip_any_text(kind, fitted, text):
    tok = fitted[kind]
    assert tok.decode(tok.encode(text)) == text


def test_char_unseen_characters_policy():
    tok = make("char")
    tok.fit("abc")
    with pytest.raises(DataError, match="never saw"):
        tok.encode("abz")
    skip = make("char", unknown="skip")
    skip.fit("abc")
    assert skip.decode(skip.encode("abzc")) == "abc"


def test_tokenizers_load_without_torch(fitted, tmp_path):
    for kind in ("bpe", "sentencepiece", "char"):
        fitted[kind].save(tmp_path / kind)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gptkit.components.tokenizers import load_tokenizer\n"
        "from gptkit.inference.onnx import _runtime_registry\n"
        "r = _runtime_registry()\n"
        f"for k in ('bpe', 'sentencepiece', 'char'):\n"
        f"    t = load_tokenizer({str(tmp_path)!r} + '/' + k, r)\n"
        "    assert t.decode(t.encode('To be, or not')) == 'To be, or not'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_pretrained_missing_file_is_a_clear_error(tmp_path):
    result = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--no-progress",
        "--set",
        "tokenizer.kind=pretrained",
        "--set",
        f"tokenizer.path={tmp_path / 'nope.json'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "tokenizer.path not found" in result.stderr


@pytest.mark.slow  # trains, generates and exports through the CLI
@pytest.mark.parametrize(
    "tokenizer",
    [
        ["tokenizer.kind=byte"],
        ["tokenizer.kind=bpe", "tokenizer.vocab_size=300"],
        ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400"],
        "pretrained",
    ],
)
def test_each_tokenizer_trains_generates_and_exports(tokenizer, hf_tokenizer_json, tmp_path):
    sets = (
        ["tokenizer.kind=pretrained", f"tokenizer.path={hf_tokenizer_json}"]
        if tokenizer == "pretrained"
        else tokenizer
    )
    args = [a for s in sets for a in ("--set", s)]
    run = tmp_path / "run"
    train = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--no-progress",
        "--run-dir",
        run,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every=3",
        "--set",
        "tracking.enabled=false",
        *args,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr
    out = run_cli("export", run, "--out", tmp_path / "bundle", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "bundle" / "gptkit.json").read_text())
    kind = sets[0].split("=")[1]
    assert manifest["spec"]["tokenizer"]["kind"] == kind
    for source in (run, tmp_path / "bundle"):
        gen = run_cli("generate", source, "-p", "ROMEO:", "-n", "12", "--seed", "1")
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.startswith("ROMEO:")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece", "pretrained"])
def test_streamed_text_decoded_incrementally_equals_decoding_all_tokens(kind, fitted):
    """Generation decodes a row's text incrementally (settled tokens are not decoded again):
    after every token the text equals decoding all of them, for every kind, on real text
    (leading spaces, multi-byte characters) and on random tokens (byte-level ones cut
    characters in half)."""
    import random

    from gptkit.inference.decoding import _TextStream

    tok = fitted[kind]
    text = "ROMEO: Ça va? «Ô» naïve café — déjà vu.\n  And thou, what say'st thou? 日本語 ok " * 4
    rng = random.Random(0)
    if kind == "char":  # it knows the corpus's characters only
        text = "".join(c for c in text if c in CORPUS)
    sequences = [tok.encode(text), [rng.randrange(tok.vocab_size) for _ in range(300)]]
    for ids in sequences:
        stream = _TextStream(tok.decode, [])
        for i, token in enumerate(ids):
            stream.add(token)
            assert stream.text == tok.decode(ids[: i + 1]), (kind, i)
        assert stream.settled > len(ids) // 2  # the text did settle as it went


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece", "pretrained"])
def test_the_tokens_of_a_stop_cut_text_are_those_that_begin_inside_it(kind, fitted):
    """A stop string cuts the text; its tokens are generated but not returned, nor are their
    log-probabilities (``text_tokens``): every kind, with a multi-byte character just before
    the stop (a byte-level tokenizer's half character decodes to a replacement character of
    the same length, so counting characters would drop its second half)."""
    from gptkit.inference.decoding import _TextStream

    tok = fitted[kind]
    for text, stop in (("déjà vu, sir", ","), ("café and tea", " and"), ("ROMEO: hi", "hi")):
        if kind == "char":
            text = "".join(c for c in text if c in CORPUS)
        ids = tok.encode(text)
        stream = _TextStream(tok.decode, [stop])
        for token in ids:
            stream.add(token)
            if stream.stopped:
                break
        assert stream.stopped, (kind, text)
        k = stream.text_tokens()
        assert tok.decode(stream.tokens[:k]).startswith(stream.text), (kind, text)
        assert k == len(stream.tokens) or not tok.decode(stream.tokens[: k - 1]).startswith(
            stream.text
        )  # none fewer would do
        assert k < len(stream.tokens)  # the stop string's tokens are left out


def _metaspace_and_wordpiece(folder):
    """Two tokenizer.json files whose decoders drop the space that begins a text: a unigram
    one with a Metaspace decoder (Llama, T5) and a WordPiece one (BERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<unk>"]
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer, uni.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    uni.train_from_iterator(
        [CORPUS[:20_000]], trainers.UnigramTrainer(vocab_size=200, special_tokens=special)
    )
    wp = Tokenizer(models.WordPiece(unk_token="<unk>"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=False)
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    wp.train_from_iterator(
        [CORPUS[:20_000]], trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    )
    paths = {"metaspace": folder / "metaspace.json", "wordpiece": folder / "wordpiece.json"}
    uni.save(str(paths["metaspace"]))
    wp.save(str(paths["wordpiece"]))
    return paths


class _Scripted:
    """A backend whose greedy choice is a fixed continuation (the prompt's length read from
    the first call; no cache)."""

    max_seq_len = 256

    def __init__(self, script, vocab):
        self.script, self.vocab, self.prompt = script, vocab, None

    def __call__(self, ids, positions, key_mask, past):
        import numpy as np

        self.prompt = self.prompt or ids.shape[1]
        logits = np.zeros((ids.shape[0], self.vocab), dtype=np.float32)
        logits[:, self.script[min(ids.shape[1] - self.prompt, len(self.script) - 1)]] = 10.0
        return logits, None


@pytest.mark.parametrize("kind", ["metaspace", "wordpiece"])
def test_a_continuation_reads_as_it_does_after_its_prompt(kind, tmp_path):
    """A tokenizer whose decoder drops the space that begins a text: the continuation's text
    is the text after the prompt's in decoding both together (as transformers' pipelines
    give it), whole and streamed; decoded on its own, its first word ran into the prompt's
    last ("thy" + "father" -> "thyfather")."""
    from gptkit.inference.decoding import decode_loop

    tok = make("pretrained", path=str(_metaspace_and_wordpiece(tmp_path)[kind]))
    tok.fit(CORPUS)  # a pretrained tokenizer is read, not trained
    prompt, after = "Deny thy", " father and refuse thy name"
    script = tok.encode(prompt + after)[len(tok.encode(prompt)) :]
    want = tok.decode(tok.encode(prompt) + script)[len(tok.decode(tok.encode(prompt))) :]
    assert want.startswith(" ") and not tok.decode(script).startswith(" ")
    sampler = load_registry().get("sampler", "greedy").model_validate({"kind": "greedy"})
    pieces = []
    out = decode_loop(
        _Scripted(script, tok.vocab_size),
        tok,
        [prompt],
        sampler,
        max_new_tokens=len(script),
        use_cache=False,
        on_text=lambda row, piece: pieces.append(piece),
    )
    assert out[0].tokens == script
    assert out[0].text == want
    assert "".join(pieces) == want


def test_a_vocabulary_with_id_gaps_is_sized_past_its_largest_id(tmp_path):
    """A hand-made tokenizer.json whose ids skip (5 tokens, the last id 5000): its size is
    5001, so a model of 100 embeddings is refused for it (it counted 5 and passed, then the
    first "z" indexed row 5000) and sampling ranges over every id it can decode."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from gptkit.components.tokenizers import vocabulary_misfit

    vocab = {"a": 0, "b": 1, "[UNK]": 2, "<|endoftext|>": 3, "z": 5000}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = make("pretrained", path=str(tmp_path / "tokenizer.json"))
    tok.fit("")
    assert tok.encode("a z") == [0, 5000]
    assert tok.vocab_size == 5001
    assert "the model only 100" in vocabulary_misfit(tok, 100)
    assert vocabulary_misfit(tok, 5001) is None
