"""Where a corpus comes from: the embedded corpus, text files, JSON Lines, Parquet and Hugging Face
datasets saved on disk, resolved from ``data.source`` and read as pieces of documents."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

from gptkit.errors import DataError
from gptkit.safeio import open_stream, read_json, walk_files

EMBEDDED = {
    "tinyshakespeare": (
        "tinyshakespeare.txt.gz",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


PIECE_BYTES = 1 << 20  # text per unit of work: big enough to amortise, small enough to bound memory


RECORD_BATCH = 1024  # records per piece for Parquet / datasets sources


MAX_STATE = 16 << 20  # bytes of a saved dataset's state.json


def load_corpus(name: str) -> str:
    """An embedded corpus by name (checked against its recorded sha256)."""
    return _embedded_bytes(name).decode("utf-8")


def _embedded_bytes(name: str) -> bytes:
    filename, sha = EMBEDDED[name]
    raw = gzip.decompress(resources.files("gptkit.corpora").joinpath(filename).read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha:
        raise DataError(f"embedded corpus '{name}' is damaged (sha256 mismatch); reinstall gptkit")
    return raw


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
    """The bytes of a saved dataset folder's files. A FIFO or device in it is refused: the
    library reading the folder would hang on it."""
    from gptkit.safeio import check_regular

    total = 0
    for p in path.rglob("*"):
        if p.exists() and not p.is_dir():
            check_regular(p, "file of saved dataset", None, DataError)
            total += p.stat().st_size
    return total


def _source(path: Path, fmt: str) -> Source:
    if not path.is_dir():
        from gptkit.safeio import check_regular

        # A regular file only: a FIFO would hang, /dev/zero never ends.
        check_regular(path, "data file", None, DataError)
    kind = _kind_of(path, fmt)
    size = _folder_size(path) if path.is_dir() else path.stat().st_size
    return Source(kind, path, str(path), size)


def glob_files(pattern: str) -> list[Path]:
    """The files (and saved Hugging Face dataset folders) a glob names, sorted. ``**`` is
    zero or more folders; hidden names are skipped. The walk is bounded and cycle-safe
    (:func:`gptkit.safeio.walk_files`): a folder holding symlinks to itself ends."""
    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
    root, pats = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    # One level past the pattern: a dataset folder it names is seen through its files.
    depth = None if "**" in pats else len(pats)
    hits = []
    for path in walk_files(root, depth, error=DataError):
        rel = path.relative_to(root).parts
        for n in range(1, len(rel) + 1):  # the file itself, or a dataset folder above it
            here = root / Path(*rel[:n])
            if _glob_match(rel[:n], pats) and (n == len(rel) or _is_hf_folder(here)):
                hits.append(here)
                break
    return sorted(set(hits))


def _glob_match(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_glob_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pats[0]) and _glob_match(parts[1:], pats[1:])


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
            matches = glob_files(item)
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
            files = walk_files(path, error=DataError)
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
    stream = open_stream(src.path, "data file", DataError) if data is None else None
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
    with open_stream(src.path, "data file", DataError) as f:
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


def _record_problem(
    src: Source, field_name: str, columns: list[str], dtype: Any, is_text: bool
) -> None:
    """Refuse a missing field, or one whose type ``dtype`` is not text (a list<string> or a
    struct holding strings is not text either)."""
    if field_name not in columns:
        raise DataError(
            f"{src.name}: no field '{field_name}' in its records (fields: "
            f"{', '.join(columns) or 'none'})",
            "Set data.field to the column that holds the text.",
        )
    if not is_text:
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
    dtype = schema.field(field_name).type if field_name in schema.names else None
    _record_problem(src, field_name, schema.names, dtype, _arrow_is_text(dtype))
    rows = pf.metadata.num_rows
    if rows == 0:
        raise DataError(f"{src.name} is empty (a Parquet file with no rows)")
    batches = (
        b.column(0).to_pylist()
        for b in pf.iter_batches(batch_size=RECORD_BATCH, columns=[field_name])
    )
    for column in _read_guarded(
        batches, f"{src.name} is not a readable Parquet file (a damaged page)"
    ):
        texts = [t for t in column if t]
        yield Piece(src.name, "docs", texts, max(1, src.size * len(column) // rows))


def _arrow_is_text(dtype: Any) -> bool:
    import pyarrow as pa

    return dtype is None or pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


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
    if state.is_file():
        doc = read_json(state, "dataset state", MAX_STATE, DataError)
        if not isinstance(doc, dict):
            raise DataError(
                f"{src.name} is not a dataset saved with save_to_disk: {state} holds a "
                f"{type(doc).__name__}, not an object"
            )
        if not doc.get("_data_files", [1]):
            raise DataError(f"{src.name} is empty (a dataset with no rows)")
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
    dtype = getattr(features.get(field_name), "dtype", type(features.get(field_name)).__name__)
    _record_problem(src, field_name, list(features), dtype, dtype in ("string", "large_string"))
    if len(ds) == 0:
        raise DataError(f"{src.name} is empty (a dataset with no rows)")
    try:  # a damaged file is read through a memory map: unchecked, it may crash the process
        ds.data.table.column(field_name).validate(full=True)
    except Exception as exc:
        raise DataError(f"{src.name} is not a readable dataset (damaged data): {exc}") from None
    batches = (b[field_name] for b in ds.select_columns([field_name]).iter(RECORD_BATCH))
    for column in _read_guarded(batches, f"{src.name} is not a readable dataset (damaged data)"):
        texts = [t for t in column if t]
        yield Piece(src.name, "docs", texts, max(1, src.size * len(column) // len(ds)))


def _read_guarded(batches: Iterator[Any], problem: str) -> Iterator[Any]:
    """``batches``, with any error of the library reading them (a damaged page or record
    shows only when it is read) made a DataError: ``problem: what the library said``."""
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:
            raise DataError(f"{problem}: {type(exc).__name__}: {exc}") from None
        if batch is None:
            return
        yield batch


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
        except RecursionError:
            raise DataError(f"{where} is nested too deeply to parse (not a text record)") from None
        if not isinstance(record, dict) or piece.field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{where}: no field '{piece.field}' in the record (has: {keys})",
                "Set data.field to the key that holds the text.",
            )
        text = record[piece.field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{piece.field}' is {type(text).__name__}, not text")
        if b"\\u" in line:  # only a \u escape can make a lone surrogate, which is not text
            _check_encodable(text, where, piece.field)
        if text:
            texts.append(text)
    return texts, True


def _check_encodable(text: str, where: str, field_name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: field '{field_name}' holds a lone surrogate "
            f"({text[exc.start]!r} at character {exc.start}), which is not text"
        ) from None


def piece_has_text(piece: Piece) -> bool:
    """Whether a piece can contribute a document (so that the next one needs a separator)."""
    return bool(piece.payload)


def load_text(source: str | list[str], fmt: str = "auto", field_name: str = "text") -> str:
    """The whole text of small sources (evaluation files, notebooks): documents joined by
    newlines. Training never calls this; it streams through
    :func:`gptkit.data.prepare.prepare_tokens`."""
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
