"""Text to token ids: the fast paths for char and byte tokenizers, documents joined with end-of-
text, the worker pool, and the sample a tokenizer is fitted on."""

from __future__ import annotations

import os

import numpy as np

from gptkit.data.sources import (
    Piece,
    Source,
    _cut_at_char,
    iter_pieces,
    piece_documents,
    resolve_sources,
)

POOL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


def _char_lut(tokenizer) -> np.ndarray:
    lut = getattr(tokenizer, "_gptkit_lut", None)
    if lut is None:
        cps = np.array([ord(c) for c in tokenizer.chars], dtype=np.int64)
        lut = np.full(int(cps.max()) + 1 if len(cps) else 1, -1, dtype=np.int32)
        lut[cps] = np.arange(len(cps), dtype=np.int32)
        tokenizer._gptkit_lut = lut
    return lut


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, int]:
    """Token ids of ``text`` (int64) and how many characters the vocabulary could not hold.

    char and byte run vectorised in NumPy (a lookup table over code points, the UTF-8 bytes);
    other tokenizers go through their own ``encode_lenient``."""
    from gptkit.components.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer

    if isinstance(tokenizer, CharTokenizer):
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:  # lone surrogates (from JSON): rare, take the slow road
            cps = np.array([ord(c) for c in text], dtype=np.uint32)
        lut = _char_lut(tokenizer)
        ids = lut[np.minimum(cps, len(lut) - 1)]
        ids[cps >= len(lut)] = -1
        keep = ids >= 0
        dropped = int(len(ids) - np.count_nonzero(keep))
        return (ids[keep] if dropped else ids).astype(np.int64), dropped
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(
            np.int64
        ), 0
    if isinstance(tokenizer, HFTokenizer):
        return np.asarray(
            tokenizer.hf.encode(text, add_special_tokens=False).ids, dtype=np.int64
        ), 0
    return np.asarray(tokenizer.encode_lenient(text), dtype=np.int64), 0


def encode_documents(
    tokenizer, texts: list[str], starts_doc: bool, first_in_stream: bool
) -> tuple[np.ndarray, int]:
    """Ids of consecutive texts with the end-of-text id before each new document (except the
    first of the whole stream)."""
    from gptkit.components.tokenizers import HFTokenizer

    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    if isinstance(tokenizer, HFTokenizer):
        # The Rust library encodes a batch on every core: cut long texts after newlines into
        # ~64 KB parts (BPE pre-tokenizes at whitespace, so this changes nothing but speed).
        parts = [_split_lines(t, 1 << 16) for t in texts]
        flat = [p for ps in parts for p in ps]
        encs = iter(tokenizer.hf.encode_batch(flat, add_special_tokens=False))
        encoded = [
            (
                np.concatenate([np.asarray(next(encs).ids, dtype=np.int64) for _ in ps])
                if ps
                else np.zeros(0, dtype=np.int64),
                0,
            )
            for ps in parts
        ]
    else:
        encoded = [encode_text(tokenizer, t) for t in texts]
    parts, dropped = [], 0
    for i, (ids, lost) in enumerate(encoded):
        new_doc = starts_doc if i == 0 else True
        if new_doc and not (first_in_stream and i == 0):
            parts.append(eot)
        parts.append(ids)
        dropped += lost
    if not parts:
        return np.zeros(0, dtype=np.int64), 0
    return np.concatenate(parts), dropped


def _split_lines(text: str, size: int) -> list[str]:
    """``text`` in consecutive parts of about ``size`` characters, each cut after a newline
    (where there is one within the next ``size`` characters)."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        if cut < 0 or cut - start > 2 * size:
            break
        out.append(text[start : cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _work(piece: Piece, first_in_stream: bool, dtype: str) -> tuple[bytes, int, int]:
    """In a worker: decode/parse a piece and tokenize it; ids come back as raw bytes."""
    texts, starts = piece_documents(piece)
    ids, dropped = encode_documents(_WORKER_TOKENIZER, texts, starts, first_in_stream)
    new_docs = len(texts) - (1 if texts and not starts else 0)
    return ids.astype(dtype).tobytes(), dropped, new_docs


def fit_sample(sources: list[Source], data_spec) -> str:
    """The text a tokenizer is fitted on: the first ``1 - val_fraction`` of the sources'
    bytes when that is at most ``fit_sample_bytes``, else a seeded sample of its pieces
    (never none: when the draw skips every piece, as it may when one record is larger than
    the sample, the first piece is cut to the bound)."""
    total = sum(s.size for s in sources)
    region = max(1, int(total * (1 - data_spec.val_fraction)))  # a 1-byte file is fitted on
    limit = data_spec.fit_sample_bytes
    keep_p = 1.0 if region <= limit else limit / region
    rng = np.random.default_rng(data_spec.fit_seed)
    texts: list[str] = []
    seen = taken = 0
    first_skipped = None
    for piece in iter_pieces(sources, data_spec.field, data_spec.split):
        if seen >= region or taken >= limit:
            break
        over = seen + piece.nbytes - region
        seen += piece.nbytes
        if piece.kind == "text" and over > 0:  # stop where the training part ends
            cut = _cut_at_char(piece.payload, len(piece.payload) - over)
            piece.payload = piece.payload[:cut]
        if keep_p < 1.0 and rng.random() >= keep_p:
            first_skipped = first_skipped or piece
            continue
        taken += _sample_docs(piece, texts, limit - taken, bounded=keep_p < 1.0)
    if not texts and first_skipped is not None:
        _sample_docs(first_skipped, texts, limit, bounded=True)
    return "\n".join(texts)


def _sample_docs(piece: Piece, texts: list[str], limit: int, bounded: bool) -> int:
    """Append a piece's documents to ``texts`` while they add fewer than ``limit`` bytes
    (``bounded``: the last one is cut so that they add at most that); the bytes added."""
    taken = 0
    docs, _ = piece_documents(piece)
    for doc in docs:
        if taken >= limit:
            break
        raw = doc.encode("utf-8", "surrogatepass")
        if bounded and len(raw) > limit - taken:  # the sample's size is a hard bound
            raw = raw[: limit - taken]
            doc = raw.decode("utf-8", "ignore")
        texts.append(doc)
        taken += len(raw)
    return taken


def fit_tokenizer(data_spec, tokenizer_spec, sources: list[Source] | None = None):
    """A tokenizer built from its spec and fitted on :func:`fit_sample` (bounded memory)."""
    tokenizer = tokenizer_spec.build()
    sources = (
        sources if sources is not None else resolve_sources(data_spec.source, data_spec.format)
    )
    if _needs_fit(tokenizer):
        tokenizer.fit(fit_sample(sources, data_spec))
    return tokenizer


def _needs_fit(tokenizer) -> bool:
    from gptkit.components.tokenizers import Tokenizer

    return type(tokenizer).fit is not Tokenizer.fit


def _workers_for(tokenizer, total_bytes: int, workers: int | None) -> int:
    from gptkit.components.tokenizers import ByteTokenizer, CharTokenizer

    if workers is not None:
        return max(1, workers)
    if not isinstance(tokenizer, (CharTokenizer, ByteTokenizer)) or total_bytes < POOL_MIN_BYTES:
        return 1  # BPE batches on every core inside the library; small corpora need no pool
    return max(1, min(os.cpu_count() or 1, 8))
