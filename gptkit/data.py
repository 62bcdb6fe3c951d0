"""Text sources, streamed into sharded token files, and the train/validation split.

The corpus never sits in memory whole. ``prepare_data`` runs one pipeline:

    sources -> pieces (~1 MB of a text file, a block of JSON Lines, a batch of records)
            -> token ids (worker processes for char/byte, the tokenizer library's batch
               encoder for BPE) -> shard files of up to ``data.shard_tokens`` ids
            -> memory-mapped for training

Conventions, all documented in the README's data section:

* **Documents.** A text file is one document; so is each JSON Lines / Parquet / dataset
  record. Documents are separated by the tokenizer's end-of-text id (``eot_id``): for ``char``
  and ``byte`` that is the id after the last character/byte (``len(chars)`` and 256), for
  BPE/SentencePiece the ``<|endoftext|>`` token. A single-file corpus therefore holds no
  end-of-text id at all, exactly as before.
* **Validation.** The last ``data.val_fraction`` of the token stream (nanoGPT's split, made on
  token ids so that it needs neither the corpus in memory nor a pass before tokenizing). It may
  cut a document in two.
* **Fitting.** Tokenizers that learn a vocabulary see a sample of the first
  ``1 - val_fraction`` of the sources' bytes: all of it when that is at most
  ``data.fit_sample_bytes``, else pieces drawn with a seeded RNG (``data.fit_seed``) up to that
  size. Characters the char tokenizer never saw are dropped (and counted).
* **Cache.** ``<cache>/tokens/<key>/`` with ``shard-NNNNN.bin`` files (llm.c/nanoGPT layout: a
  256 x int32 header - magic 20240520, version 1 for uint16 or 2 for uint32 ids, token count -
  then the ids) and ``meta.json``. The key hashes the sources' bytes and the tokenizer/data
  settings. The folder is built under a temporary name and renamed into place only when
  complete, so an interrupted or failed preparation (bad input, disk full) leaves nothing that
  looks like a valid cache.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import DataError

EMBEDDED = {
    "tinyshakespeare": (
        "tinyshakespeare.txt.gz",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}

PIECE_BYTES = 1 << 20  # text per unit of work: big enough to amortise, small enough to bound memory
RECORD_BATCH = 1024  # records per piece for Parquet / datasets sources
HEADER_INTS = 256  # llm.c's .bin header: 256 int32
MAGIC = 20240520
POOL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
CACHE_FORMAT = 2


def load_corpus(name: str) -> str:
    """An embedded corpus by name (checked against its recorded sha256)."""
    return _embedded_bytes(name).decode("utf-8")


def _embedded_bytes(name: str) -> bytes:
    filename, sha = EMBEDDED[name]
    raw = gzip.decompress(resources.files("gptkit.corpora").joinpath(filename).read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha:
        raise DataError(f"embedded corpus '{name}' is damaged (sha256 mismatch); reinstall gptkit")
    return raw


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One input: a file, a saved dataset folder, or an embedded corpus."""

    kind: str  # text | jsonl | parquet | hf | embedded
    path: Path | None
    name: str  # what messages call it
    size: int  # bytes on disk (the unit of progress and of the validation/fitting regions)


def _is_hf_folder(path: Path) -> bool:
    return any(
        (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _kind_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source(path: Path, fmt: str) -> Source:
    if not path.is_dir():
        from gptkit.safeio import check_regular

        # A regular file only: a FIFO would hang, /dev/zero never ends.
        check_regular(path, "data file", None, DataError)
    kind = _kind_of(path, fmt)
    size = _folder_size(path) if path.is_dir() else path.stat().st_size
    return Source(kind, path, str(path), size)


def resolve_sources(source: str | list[str], fmt: str = "auto") -> list[Source]:
    """Expand ``data.source`` (paths, globs, folders, an embedded name) into sources, in a
    stable order. A folder is a saved Hugging Face dataset when it holds one, else every
    file under it (sorted, hidden files skipped)."""
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise DataError("data.source is an empty list; name a file, a glob or 'tinyshakespeare'")
    out: list[Source] = []
    for item in items:
        if item in EMBEDDED:
            out.append(Source("embedded", None, item, len(_embedded_bytes(item))))
            continue
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file() or (m.is_dir() and _is_hf_folder(m))]
            if not matches:
                raise DataError(f"data.source glob '{item}' matches no files")
            out += [_source(m, fmt) for m in matches]
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(
                f"data.source file not found: {item}",
                "Use a path to a text, .jsonl or .parquet file, a folder, a glob, or "
                "'tinyshakespeare' (embedded).",
            )
        if path.is_dir() and not (fmt == "hf" or _is_hf_folder(path)):
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise DataError(f"data.source folder {item} holds no files (an empty directory)")
            out += [_source(f, fmt) for f in files]
            continue
        out.append(_source(path, fmt))
    return out


@dataclass
class Piece:
    """A unit of work: raw bytes of a text or JSON Lines file, or a list of record texts."""

    source: str  # file name, for messages
    kind: str  # text | jsonl | docs
    payload: bytes | list[str]
    nbytes: int  # source bytes this piece stands for (progress, regions)
    offset: int = 0  # byte offset in the file (text), or first line number (jsonl)
    starts_doc: bool = True  # text: the piece starts its file; jsonl/docs: always True
    field: str = "text"


def _cut_at_char(data: bytes, end: int) -> int:
    """The largest cut <= end that does not split a UTF-8 sequence."""
    while end > 0 and end < len(data) and (data[end] & 0xC0) == 0x80:
        end -= 1
    return end


def _text_pieces(src: Source, data: bytes | None = None) -> Iterator[Piece]:
    """~1 MB pieces of a text file, cut after a newline where one exists (so BPE sees whole
    lines), else at a UTF-8 character boundary."""
    if src.size == 0:
        raise DataError(f"data file {src.name} is empty", "Remove it from data.source.")
    stream = open(src.path, "rb") if data is None else None  # noqa: SIM115 - closed below
    try:
        carry, offset, first = b"", 0, True
        pos = 0
        while True:
            if stream is not None:
                block = stream.read(PIECE_BYTES)
            else:
                block, pos = data[pos : pos + PIECE_BYTES], pos + PIECE_BYTES
            buf = carry + block
            if not block:
                if buf or first:
                    yield Piece(src.name, "text", buf, len(buf), offset, first)
                return
            cut = buf.rfind(b"\n") + 1
            if cut <= 0:  # no newline: end before the last character (it may be incomplete)
                cut = _cut_at_char(buf, len(buf) - 1)
            if cut <= 0:  # one huge multi-byte sequence? keep reading
                carry = buf
                continue
            yield Piece(src.name, "text", buf[:cut], cut, offset, first)
            carry, offset, first = buf[cut:], offset + cut, False
    finally:
        if stream is not None:
            stream.close()


def _jsonl_pieces(src: Source, field_name: str) -> Iterator[Piece]:
    """Blocks of whole lines (~1 MB); the worker parses them."""
    with open(src.path, "rb") as f:
        line_no, lines, size = 1, [], 0
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= PIECE_BYTES:
                yield Piece(src.name, "jsonl", b"".join(lines), size, line_no, field=field_name)
                line_no += len(lines)
                lines, size = [], 0
        if lines:
            yield Piece(src.name, "jsonl", b"".join(lines), size, line_no, field=field_name)
    if not src.size or line_no == 1 and not any(x.strip() for x in lines):
        raise DataError(
            f"{src.name} is empty (a JSON Lines file with no records)",
            "Remove it from data.source.",
        )


def _record_problem(src: Source, field_name: str, columns: list[str], dtype: Any) -> None:
    if field_name not in columns:
        raise DataError(
            f"{src.name}: no field '{field_name}' in its records (fields: "
            f"{', '.join(columns) or 'none'})",
            "Set data.field to the column that holds the text.",
        )
    if dtype is not None and "string" not in str(dtype) and "utf8" not in str(dtype):
        raise DataError(
            f"{src.name}: field '{field_name}' holds {dtype}, not text",
            "Set data.field to the column that holds the text.",
        )


def _parquet_pieces(src: Source, field_name: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{src.name}: reading Parquet needs pyarrow, which is not installed",
            "Install it: pip install 'gptkit[data]'.",
        ) from None
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as exc:
        raise DataError(f"{src.name} is not a readable Parquet file: {exc}") from None
    schema = pf.schema_arrow
    _record_problem(
        src,
        field_name,
        schema.names,
        schema.field(field_name).type if field_name in schema.names else None,
    )
    rows = pf.metadata.num_rows
    if rows == 0:
        raise DataError(f"{src.name} is empty (a Parquet file with no rows)")
    for batch in pf.iter_batches(batch_size=RECORD_BATCH, columns=[field_name]):
        texts = [t for t in batch.column(0).to_pylist() if t]
        yield Piece(src.name, "docs", texts, max(1, src.size * batch.num_rows // rows))


def _hf_pieces(src: Source, field_name: str, split: str) -> Iterator[Piece]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{src.name}: reading a saved Hugging Face dataset needs 'datasets', "
            "which is not installed",
            "Install it: pip install 'gptkit[data]'.",
        ) from None
    state = src.path / "state.json"
    try:
        if state.is_file() and not json.loads(state.read_text()).get("_data_files", [1]):
            raise DataError(f"{src.name} is empty (a dataset with no rows)")
    except ValueError:
        pass  # not our business: load_from_disk says what is wrong with it
    try:
        ds = datasets.load_from_disk(str(src.path))
    except Exception as exc:
        raise DataError(f"{src.name} is not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{src.name}: no split '{split}' (splits: {', '.join(ds)})",
                "Set data.split to one of them.",
            )
        ds = ds[split]
    features = ds.features
    _record_problem(
        src, field_name, list(features), getattr(features.get(field_name), "dtype", "non-text")
    )
    if len(ds) == 0:
        raise DataError(f"{src.name} is empty (a dataset with no rows)")
    ds = ds.select_columns([field_name])
    for batch in ds.iter(batch_size=RECORD_BATCH):
        texts = [t for t in batch[field_name] if t]
        yield Piece(src.name, "docs", texts, max(1, src.size * len(batch[field_name]) // len(ds)))


def iter_pieces(
    sources: list[Source], field_name: str = "text", split: str = "train"
) -> Iterator[Piece]:
    """Every source's pieces, in order (each piece bounded in size)."""
    for src in sources:
        if src.kind == "embedded":
            yield from _text_pieces(src, _embedded_bytes(src.name))
        elif src.kind == "text":
            yield from _text_pieces(src)
        elif src.kind == "jsonl":
            yield from _jsonl_pieces(src, field_name)
        elif src.kind == "parquet":
            yield from _parquet_pieces(src, field_name)
        elif src.kind == "hf":
            yield from _hf_pieces(src, field_name, split)
        else:  # pragma: no cover - format is a Literal in the spec
            raise DataError(f"unknown data.format '{src.kind}'")


def piece_documents(piece: Piece) -> tuple[list[str], bool]:
    """The texts of a piece and whether the first one starts a new document.

    Raises DataError naming the file and place of bad input (binary, not UTF-8, bad JSON,
    missing or non-text field)."""
    if piece.kind == "docs":
        return list(piece.payload), True
    raw = piece.payload
    if piece.kind == "text":
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise DataError(
                f"data file {piece.source} looks binary (it contains NUL bytes, the "
                f"first at byte {piece.offset + nul}); expected UTF-8 text"
            )
        if piece.offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark is not text
        try:
            return [raw.decode("utf-8")], piece.starts_doc
        except UnicodeDecodeError as exc:
            raise DataError(
                f"data file {piece.source} is not UTF-8 text (bad byte at offset "
                f"{piece.offset + exc.start}); mixed or legacy encodings must be converted",
                "Convert it, e.g.: iconv -f latin1 -t utf-8 FILE > FILE.utf8",
            ) from None
    texts = []
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        where = f"{piece.source} line {piece.offset + i}"
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{where} is not valid JSON (or not UTF-8): {exc}") from None
        if not isinstance(record, dict) or piece.field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{where}: no field '{piece.field}' in the record (has: {keys})",
                "Set data.field to the key that holds the text.",
            )
        text = record[piece.field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{piece.field}' is {type(text).__name__}, not text")
        if text:
            texts.append(text)
    return texts, True


# --------------------------------------------------------------------------- encoding


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


# --------------------------------------------------------------------------- shards on disk


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $GPTKIT_CACHE_DIR, else ~/.cache/gptkit."""
    root = os.environ.get("GPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkit"
    )
    return Path(root)


def token_dtype(vocab_size: int):
    """uint16 while every id fits (as nanoGPT's .bin files), else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard_header(f, dtype, n_tokens: int) -> None:
    """llm.c's header: magic, version (1: uint16 ids, 2: uint32), the count as int32 in [2]
    (as llm.c reads it) and as int64 in [4:6] (shards past 2**31 ids)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (
        MAGIC,
        1 if np.dtype(dtype) == np.uint16 else 2,
        min(n_tokens, np.iinfo(np.int32).max),
    )
    header.view(np.int64)[2] = n_tokens
    f.seek(0)
    f.write(header.tobytes())


def open_shard(path: Path, expected: int | None = None) -> np.memmap:
    """Memory-map a shard after checking its header (and its length against ``expected``)."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] not in (1, 2):
        raise ValueError(f"{path} is not a gptkit/llm.c token shard")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    n = int(header.view(np.int64)[2])
    if expected is not None and n != expected:
        raise ValueError(f"{path}: header says {n} tokens, meta.json {expected}")
    if path.stat().st_size != HEADER_INTS * 4 + n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} is truncated")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,))


class ShardWriter:
    """Append ids to ``shard-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.limit = folder, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f = None
        self._n = 0
        self.total = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
        write_shard_header(self._f, self.dtype, 0)
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def _close(self) -> None:
        if self._f is not None:
            write_shard_header(self._f, self.dtype, self._n)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1]["tokens"] = self._n
            self._f = None

    def write(self, ids: bytes) -> None:
        arr = np.frombuffer(ids, dtype=self.dtype)
        while len(arr):
            if self._f is None or self._n >= self.limit:
                self._close()
                self._open()
            take = arr[: self.limit - self._n]
            self._f.write(take.tobytes())
            self._n += len(take)
            self.total += len(take)
            arr = arr[len(take) :]

    def finish(self) -> list[dict[str, Any]]:
        if self._f is None and not self.shards:
            self._open()
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class TokenArray:
    """Ids ``[start, stop)`` of a token stream kept in several memory-mapped shards, read as
    one 1-D array: ``len()``, ints, slices and NumPy fancy indexing
    (``data[starts[:, None] + np.arange(block + 1)]``) all work and read only what they touch."""

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
        total = int(self.offsets[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"bad token range [{start}, {stop}) of {total}")
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def _gather(self, absolute: np.ndarray) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][absolute])
        which = np.searchsorted(self.offsets, absolute, side="right") - 1
        out = np.empty(absolute.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][absolute[mask] - self.offsets[s]]
        return out

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"token index {index} out of range for {n} tokens")
            return self._gather(np.array([self.start + i]))[0]
        if isinstance(index, slice):
            lo, hi, step = index.indices(n)
            lo, hi = self.start + lo, self.start + max(lo, hi)
            if step != 1:
                return self[np.arange(lo - self.start, hi - self.start, step)]
            parts = []
            for s, shard in enumerate(self.shards):
                a, b = max(lo, self.offsets[s]), min(hi, self.offsets[s + 1])
                if a < b:
                    parts.append(shard[a - self.offsets[s] : b - self.offsets[s]])
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        idx = np.asarray(index)
        if idx.dtype == bool:
            raise IndexError("boolean masks are not supported on a TokenArray")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"token index out of range for {n} tokens")
        return self._gather(idx + self.start)

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self[:])
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        return f"TokenArray({len(self):,} tokens in {len(self.shards)} shard(s))"


class TokenData:
    """Train and validation token ids (memory-mapped shards) and the fitted tokenizer."""

    def __init__(
        self,
        train,
        val,
        tokenizer,
        cached: bool,
        folder: Path | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.train = train  # TokenArray (1-D, memory-mapped)
        self.val = val
        self.tokenizer = tokenizer
        self.cached = cached  # True when read back from the cache, not tokenized now
        self.folder = folder  # the cache entry
        self.meta = meta or {}  # the cache entry's meta.json: source bytes, shards, documents


# --------------------------------------------------------------------------- fitting


def fit_sample(sources: list[Source], data_spec) -> str:
    """The text a tokenizer is fitted on: the first ``1 - val_fraction`` of the sources'
    bytes when that is at most ``fit_sample_bytes``, else a seeded sample of its pieces."""
    total = sum(s.size for s in sources)
    region = int(total * (1 - data_spec.val_fraction))
    limit = data_spec.fit_sample_bytes
    keep_p = 1.0 if region <= limit else limit / region
    rng = np.random.default_rng(data_spec.fit_seed)
    texts: list[str] = []
    seen = taken = 0
    for piece in iter_pieces(sources, data_spec.field, data_spec.split):
        if seen >= region or taken >= limit:
            break
        over = seen + piece.nbytes - region
        seen += piece.nbytes
        if keep_p < 1.0 and rng.random() >= keep_p:
            continue
        if piece.kind == "text" and over > 0:  # stop where the training part ends
            cut = _cut_at_char(piece.payload, len(piece.payload) - over)
            piece.payload = piece.payload[:cut]
        docs, _ = piece_documents(piece)
        for doc in docs:
            if taken >= limit:
                break
            raw = doc.encode("utf-8", "surrogatepass")
            if keep_p < 1.0 and len(raw) > limit - taken:  # the sample's size is a hard bound
                raw = raw[: limit - taken]
                doc = raw.decode("utf-8", "ignore")
            texts.append(doc)
            taken += len(raw)
    return "\n".join(texts)


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


# --------------------------------------------------------------------------- progress


class PrepareProgress:
    """MB done, MB/s and ETA: a live bar on a terminal, a plain line every few seconds else."""

    def __init__(self, total_bytes: int, enabled: bool, label: str = "tokenize") -> None:
        self.total, self.enabled, self.label = max(1, total_bytes), enabled, label
        self.done = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total))
            return
        now = time.perf_counter()
        if now - self._last >= 5.0:
            self._last = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0
        return (
            f"{self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"({100 * min(1.0, self.done / self.total):.0f}%) | {rate / 1e6:.1f} MB/s | "
            f"eta {int(eta) // 60}m{int(eta) % 60:02d}s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --------------------------------------------------------------------------- prepare


def _content_digest(sources: list[Source]) -> str:
    """sha256 over every source's bytes (streamed in 8 MB blocks)."""
    h = hashlib.sha256()
    for src in sources:
        h.update(f"{src.kind}\0".encode())
        if src.kind == "embedded":
            h.update(EMBEDDED[src.name][1].encode())
            continue
        files = (
            sorted(p for p in src.path.rglob("*") if p.is_file())
            if src.path.is_dir()
            else [src.path]
        )
        for path in files:
            h.update(f"{path.relative_to(src.path) if src.path.is_dir() else ''}\0".encode())
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
    return h.hexdigest()


def cache_key(data_spec, tokenizer_spec, digest: str) -> str:
    """The cache entry's name: the content hash, then a hash of everything that shapes ids."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "tok": tokenizer_spec.model_dump(mode="json", exclude={"chat_template"}),
            "fingerprint": tokenizer_spec.fingerprint(),
            "data": data_spec.model_dump(mode="json", exclude={"source"}),
        },
        sort_keys=True,
    )
    return f"{digest[:16]}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _workers_for(tokenizer, total_bytes: int, workers: int | None) -> int:
    from gptkit.components.tokenizers import ByteTokenizer, CharTokenizer

    if workers is not None:
        return max(1, workers)
    if not isinstance(tokenizer, (CharTokenizer, ByteTokenizer)) or total_bytes < POOL_MIN_BYTES:
        return 1  # BPE batches on every core inside the library; small corpora need no pool
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenize_into(
    sources: list[Source],
    data_spec,
    tokenizer,
    writer: ShardWriter,
    progress: PrepareProgress,
    workers: int,
) -> dict[str, int]:
    """Run every piece through the tokenizer into ``writer``, in order, ``workers`` at once."""
    dtype = writer.dtype.name
    stats = {"documents": 0, "dropped": 0}
    pieces = iter_pieces(sources, data_spec.field, data_spec.split)

    def take(result, nbytes):
        ids, dropped, docs = result
        writer.write(ids)
        stats["dropped"] += dropped
        stats["documents"] += docs
        progress.advance(nbytes)

    first = True
    if workers <= 1:
        _init_worker(tokenizer)
        for piece in pieces:
            take(_work(piece, first, dtype), piece.nbytes)
            first = first and not piece_has_text(piece)
        return stats
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: workers start at once and need no importable __main__ (a
    # notebook, a script without a main guard). They only run NumPy and the tokenizer.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        window: deque = deque()
        try:
            for piece in pieces:
                # Bounded: at most 2 pieces per worker are in flight, whatever the corpus size.
                window.append((pool.submit(_work, piece, first, dtype), piece.nbytes))
                first = first and not piece_has_text(piece)
                while len(window) >= 2 * workers:
                    fut, nbytes = window.popleft()
                    take(fut.result(), nbytes)
            while window:
                fut, nbytes = window.popleft()
                take(fut.result(), nbytes)
        except BaseException:
            for fut, _ in window:
                fut.cancel()
            raise
    return stats


def piece_has_text(piece: Piece) -> bool:
    """Whether a piece can contribute a document (so that the next one needs a separator)."""
    return bool(piece.payload)


def _load_entry(folder: Path, registry=None):
    """(meta, tokenizer, shards) of a complete cache entry; raises if anything is off."""
    from gptkit.components.tokenizers import load_tokenizer

    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError("old cache format")
    tokenizer = load_tokenizer(folder / "tokenizer", registry)
    shards = [open_shard(folder / s["file"], s["tokens"]) for s in meta["shards"]]
    return meta, tokenizer, shards


def _remove_stale_builds(folder: Path) -> None:
    """Delete temporary folders left by builds of this entry whose process is gone (killed)."""
    for tmp in folder.parent.glob(f".tmp-{folder.name}-*"):
        try:
            os.kill(int(tmp.name.split("-")[-2]), 0)  # still running: leave it be
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _build_entry(
    folder: Path,
    sources,
    data_spec,
    tokenizer_spec,
    digest: str,
    progress: bool | None,
    workers: int | None,
    log,
) -> None:
    """Fit, tokenize and write a cache entry under a temporary name; rename it into place."""
    total = sum(s.size for s in sources)
    show = progress if progress is not None else total >= POOL_MIN_BYTES
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    writer = None
    try:
        started = time.perf_counter()
        tokenizer = fit_tokenizer(data_spec, tokenizer_spec, sources)
        tokenizer.save(tmp / "tokenizer")
        dtype = token_dtype(tokenizer.vocab_size)
        writer = ShardWriter(tmp, dtype, data_spec.shard_tokens)
        n_workers = _workers_for(tokenizer, total, workers)
        bar = PrepareProgress(total, show)
        try:
            stats = _tokenize_into(sources, data_spec, tokenizer, writer, bar, n_workers)
        finally:
            bar.close()
        shards = writer.finish()
        elapsed = time.perf_counter() - started
        meta = {
            "format": CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "tokens": writer.total,
            "shards": shards,
            "eot_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size,
            "val_fraction": data_spec.val_fraction,
            "documents": stats["documents"],
            "dropped_characters": stats["dropped"],
            "source_bytes": total,
            "content_sha256": digest,
            "sources": [s.name for s in sources],
            "workers": n_workers,
            "seconds": round(elapsed, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if show:
            log(
                f"tokenized {total / 1e6:,.1f} MB into {writer.total:,} tokens in {elapsed:.1f}s "
                f"({total / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {n_workers} process"
                f"{'es' if n_workers > 1 else ''})"
            )
        if folder.exists():  # a damaged entry, or another process finished first
            try:
                _load_entry(folder)
                return  # theirs is complete: keep it, drop ours
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError as exc:
        raise DataError(
            f"could not write the token cache in {folder.parent}: {exc.strerror or exc}; "
            "nothing was kept",
            "Free space, or point GPTKIT_CACHE_DIR at a disk with room.",
        ) from None
    finally:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(
    data_spec,
    tokenizer_spec,
    min_len: int = 0,
    cache: Path | None = None,
    progress: bool | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TokenData:
    """Tokenize ``data_spec``'s sources into sharded token files (or reuse them) and split.

    The cache key is the sources' content hash plus the tokenizer and data settings; the
    fitted tokenizer is cached with the ids, so a second run neither refits nor re-tokenizes.
    ``min_len``: each part must hold more tokens than this (one training window plus its
    target). ``progress``: show a bar (None: only for corpora of 32 MB and more).
    ``workers``: tokenizing processes (None: every core for char/byte on large corpora).
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    sources = resolve_sources(data_spec.source, data_spec.format)
    digest = _content_digest(sources)
    key = cache_key(data_spec, tokenizer_spec, digest)
    folder = (cache or cache_dir()) / "tokens" / key
    cached = True
    try:
        meta, tokenizer, shards = _load_entry(folder)
    except Exception:  # missing or damaged: (re)build it
        cached = False
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder)
        _build_entry(folder, sources, data_spec, tokenizer_spec, digest, progress, workers, log)
        meta, tokenizer, shards = _load_entry(folder)
    # The entry is keyed on every spec field that shapes ids; the others (the chat template)
    # are this spec's, not those of the run that built the entry.
    tokenizer.spec = tokenizer_spec
    total = int(meta["tokens"])
    if total == 0:
        raise DataError(
            f"data.source {data_spec.source!r} is empty (no text in "
            f"{', '.join(meta['sources'][:3])})"
        )
    if meta.get("dropped_characters"):
        log(
            f"gptkit: note: {meta['dropped_characters']:,} characters outside the tokenizer's "
            "vocabulary (fitted on a sample) were dropped"
        )
    cut = int(total * (1 - data_spec.val_fraction))
    train, val = TokenArray(shards, 0, cut), TokenArray(shards, cut, total)
    for name, arr in (("training", train), ("validation", val)):
        if len(arr) <= min_len:
            raise DataError(
                f"the {name} part of data.source has {len(arr)} tokens; it needs more than "
                f"{min_len} (one window of model.max_seq_len plus its target)",
                "Use more text, a smaller model.max_seq_len, or another data.val_fraction.",
            )
    return TokenData(train, val, tokenizer, cached, folder, meta)


# --------------------------------------------------------------------------- whole texts


def load_text(source: str | list[str], fmt: str = "auto", field_name: str = "text") -> str:
    """The whole text of small sources (evaluation files, notebooks): documents joined by
    newlines. Training never calls this; it streams through :func:`prepare_data`."""
    texts = []
    for piece in iter_pieces(resolve_sources(source, fmt), field_name):
        docs, starts = piece_documents(piece)
        for i, doc in enumerate(docs):
            if texts and (starts or i > 0):
                texts.append("\n")
            texts.append(doc)
    text = "".join(texts)
    if not text.strip():
        raise DataError(f"data.source {source!r} is empty")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by position: the last ``val_fraction`` of the text is validation (as nanoGPT)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]
