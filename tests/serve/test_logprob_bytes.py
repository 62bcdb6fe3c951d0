"""Log-probabilities of byte-level tokens: a token that is part of a character shows its own
bytes (chat's ``bytes``, completions' ``bytes:\\x..`` text), and completions' ``text_offset``
counts characters of the text returned, a character split over tokens once."""

import pytest

import gptkit.components.tokenizers as T
from gptkit.inference.decoding import TokenLogprob
from gptkit.serve.render import ChatRender, TextRender

TEXT = "café €"


def _byte():
    return T.ByteTokenizerSpec().build()


def _trained(spec):
    tok = spec.build()
    tok.fit("a plain english text, nothing else in it. " * 30)  # é and € are never merged
    return tok


TOKENIZERS = [
    pytest.param(_byte, id="byte"),
    pytest.param(lambda: _trained(T.BPETokenizerSpec(vocab_size=300)), id="bpe"),
    pytest.param(lambda: _trained(T.SentencePieceSpec(vocab_size=300)), id="sentencepiece"),
]


@pytest.mark.parametrize("make", TOKENIZERS)
def test_partial_characters_show_their_bytes_and_offsets_count_characters(make):
    tok = make()
    ids = tok.encode(TEXT)
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()
    tokens = [TokenLogprob(i, -0.5, [(i, -0.5)]) for i in ids]

    chat = ChatRender("m", None, tok.token_bytes).logprobs(0, tokens)["content"]
    assert b"".join(bytes(e["bytes"]) for e in chat) == TEXT.encode()
    assert any(e["token"].startswith("bytes:") for e in chat)  # é's or €'s bytes, apart

    whole = TextRender("m", None, tok.token_bytes).logprobs(0, tokens)
    assert len(whole["tokens"]) == len(ids) == len(whole["text_offset"])
    for text, i in zip(whole["tokens"], ids):
        piece = tok.token_bytes(i)
        if text.startswith("bytes:"):
            assert bytes.fromhex(text[6:].replace("\\x", "")) == piece
        else:
            assert text == piece.decode()
    offsets = whole["text_offset"]
    assert offsets == sorted(offsets) and max(offsets) < len(TEXT)
    # Each token starts at the character its first byte belongs to.
    starts, at = [], 0
    for i in ids:
        starts.append(len(TEXT.encode()[:at].decode("utf-8", errors="ignore")))
        at += len(tok.token_bytes(i))
    assert offsets == starts

    # Streamed in two chunks, the offsets go on where the first chunk left them.
    render = TextRender("m", None, tok.token_bytes)
    cut = next(k for k, i in enumerate(ids) if not tok.token_bytes(i).isascii())
    first = render.logprobs(0, tokens[: cut + 1])
    rest = render.logprobs(0, tokens[cut + 1 :])
    assert first["text_offset"] + rest["text_offset"] == offsets
    assert first["tokens"] + rest["tokens"] == whole["tokens"]


def test_a_char_tokenizer_is_unchanged():
    tok = T.CharTokenizerSpec().build()
    tok.fit(TEXT)
    ids = tok.encode(TEXT)
    tokens = [TokenLogprob(i, -1.0) for i in ids]
    whole = TextRender("m", None, tok.token_bytes).logprobs(0, tokens)
    assert whole["tokens"] == list(TEXT) and whole["text_offset"] == list(range(len(TEXT)))
    chat = ChatRender("m", None, tok.token_bytes).logprobs(0, tokens)["content"]
    assert [e["token"] for e in chat] == list(TEXT)
    assert [bytes(e["bytes"]).decode() for e in chat] == list(TEXT)


def test_offsets_after_bytes_that_are_not_utf8_point_at_the_text_returned():
    """A model may write bytes that are no character (a lead byte, then no continuation):
    the text shows U+FFFD for them, and the next token's offset counts it."""
    tok = _byte()
    ids = [0xDE, 0xED, 0xED, ord("9"), 0xC3, 0xA9, ord("x")]
    text = bytes(ids).decode("utf-8", errors="replace")
    assert text == "\ufffd\ufffd\ufffd9éx"
    got = TextRender("m", None, tok.token_bytes).logprobs(0, [TokenLogprob(i, -1.0) for i in ids])
    assert got["text_offset"] == [0, 1, 2, 3, 4, 4, 5]
    assert all(text[o] == "9" for o, i in zip(got["text_offset"], ids) if i == ord("9"))
