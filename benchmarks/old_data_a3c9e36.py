# gptkit/data.py as of a3c9e36 (whole corpus in memory): the baseline of bench_tokenize.py.
"""Text sources and the train/validation split."""

from __future__ import annotations

import glob
import gzip
import hashlib
from importlib import resources
from pathlib import Path

from gptkit.errors import DataError

EMBEDDED = {
    "tinyshakespeare": (
        "tinyshakespeare.txt.gz",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


def load_corpus(name: str) -> str:
    """An embedded corpus by name (checked against its recorded sha256)."""
    filename, sha = EMBEDDED[name]
    raw = gzip.decompress(resources.files("gptkit.corpora").joinpath(filename).read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha:
        raise DataError(f"embedded corpus '{name}' is damaged (sha256 mismatch); reinstall gptkit")
    return raw.decode("utf-8")


def resolve_sources(source: str | list[str]) -> list[Path]:
    """Expand a path, a glob, or a list of them into files, in a stable order."""
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise DataError("data.source is an empty list; name a file, a glob or 'tinyshakespeare'")
    files: list[Path] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"data.source glob '{item}' matches no files")
            files += matches
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(
                f"data.source file not found: {item}",
                "Use a path to a UTF-8 text file, a glob, or 'tinyshakespeare' (embedded).",
            )
        if path.is_dir():
            raise DataError(
                f"data.source {item} is a directory; give files or a glob like '{item}/*.txt'"
            )
        files.append(path)
    return files


def load_text(source: str | list[str]) -> str:
    """The whole text of ``data.source``: an embedded corpus name, a file, a glob or a list."""
    if isinstance(source, str) and source in EMBEDDED:
        return load_corpus(source)
    parts = []
    for path in resolve_sources(source):
        raw = path.read_bytes()
        if b"\x00" in raw[:65536]:
            raise DataError(f"data file {path} looks binary (it contains NUL bytes); expected text")
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"data file {path} is not UTF-8 text (bad byte at offset {exc.start})"
            ) from None
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"data.source {source!r} is empty")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by position: the last ``val_fraction`` of the text is validation (as nanoGPT)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------- tokens on disk


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $GPTKIT_CACHE_DIR, else ~/.cache/gptkit."""
    import os

    root = os.environ.get("GPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkit"
    )
    return Path(root)


def token_dtype(vocab_size: int):
    """The smallest unsigned integer type that holds every token id."""
    import numpy as np

    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    return np.int64


class TokenData:
    """Train and validation token ids (memory-mapped) and the fitted tokenizer."""

    def __init__(self, train, val, tokenizer, text_bytes: int, key: str, cached: bool) -> None:
        self.train = train  # np.memmap, 1-D
        self.val = val
        self.tokenizer = tokenizer
        self.text_bytes = text_bytes
        self.key = key
        self.cached = cached  # True when read back from the cache, not tokenized now


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_data(data_spec, tokenizer_spec, min_len: int = 0, cache: Path | None = None):
    """Load text, fit the tokenizer on the training part, tokenize both parts (cached).

    The cache key is the text's sha256 plus the tokenizer spec; the fitted tokenizer is cached
    with the ids, so a second run neither refits nor re-tokenizes. ``min_len``: each part must
    hold more tokens than this (one training window plus its target).
    """
    import json

    import numpy as np

    from gptkit.components.tokenizers import load_tokenizer

    text = load_text(data_spec.source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    spec_blob = json.dumps(
        {
            "tok": tokenizer_spec.model_dump(mode="json"),
            "val": data_spec.val_fraction,
            "fingerprint": tokenizer_spec.fingerprint(),
        },
        sort_keys=True,
    )
    key = f"{digest}-{hashlib.sha256(spec_blob.encode()).hexdigest()[:12]}"
    folder = (cache or cache_dir()) / "tokens" / key
    meta_path = folder / "meta.json"
    train_text, val_text = split_text(text, data_spec.val_fraction)

    arrays = None
    cached = False
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            tokenizer = load_tokenizer(folder / "tokenizer")
            arrays = [
                np.memmap(
                    folder / f"{part}.bin", dtype=meta["dtype"], mode="r", shape=(meta[part],)
                )
                for part in ("train", "val")
            ]
            cached = True
        except Exception:
            arrays = None  # a damaged cache entry is rebuilt
    if arrays is None:
        tokenizer = tokenizer_spec.build()
        tokenizer.fit(train_text)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(folder / "tokenizer")
        dtype = token_dtype(tokenizer.vocab_size)
        ids = {}
        for part, part_text in (("train", train_text), ("val", val_text)):
            # The held-out part may hold characters the training part never had.
            arr = np.asarray(tokenizer.encode_lenient(part_text), dtype=dtype)
            _atomic_write_bytes(folder / f"{part}.bin", arr.tobytes())
            ids[part] = len(arr)
        meta = {"dtype": np.dtype(dtype).name, **ids, "text_sha256": digest}
        _atomic_write_bytes(meta_path, json.dumps(meta).encode())
        arrays = [
            np.memmap(folder / f"{part}.bin", dtype=dtype, mode="r", shape=(ids[part],))
            if ids[part]
            else np.zeros(0, dtype=dtype)
            for part in ("train", "val")
        ]
    train, val = arrays
    for name, arr in (("training", train), ("validation", val)):
        if len(arr) <= min_len:
            raise DataError(
                f"the {name} part of data.source has {len(arr)} tokens; it needs more than "
                f"{min_len} (one window of model.max_seq_len plus its target)",
                "Use more text, a smaller model.max_seq_len, or another data.val_fraction.",
            )
    return TokenData(train, val, tokenizer, len(text.encode("utf-8")), key, cached)
