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
