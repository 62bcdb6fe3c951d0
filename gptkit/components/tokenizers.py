"""Tokenizers: char and byte. Torch-free, so exported bundles load them without torch.

A tokenizer is fitted on the training text, then saved in a folder as ``tokenizer.gptkit.json``
(its spec and fitted state) plus any files of its own; :func:`load_tokenizer` reads it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gptkit.components.base import TokenizerSpec
from gptkit.errors import DataError, RunError
from gptkit.hookspecs import hookimpl

TOKENIZER_FILE = "tokenizer.gptkit.json"
EOT = "<|endoftext|>"


class Tokenizer:
    """Base tokenizer. Subclasses set ``vocab_size``/``eot_id`` and implement the hooks."""

    spec: TokenizerSpec
    vocab_size: int
    eot_id: int

    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec

    @property
    def pad_id(self) -> int:
        """Padding shares the end-of-text id; padded positions are masked out anyway."""
        return self.eot_id

    def fit(self, text: str) -> None:
        """Learn the vocabulary from training text (a no-op for fixed vocabularies)."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_lenient(self, text: str) -> list[int]:
        """Encode, dropping what the vocabulary cannot represent (for held-out text)."""
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON-able fitted state (the vocabulary)."""
        return {}

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        """Restore :meth:`state`; ``directory`` holds any files :meth:`save_files` wrote."""

    def save_files(self, directory: Path) -> list[str]:
        """Write extra files (e.g. a tokenizer.json); return their names."""
        return []

    def identity(self) -> str:
        """A hash of the spec and fitted state: the token cache keys on it."""
        blob = json.dumps({"spec": self.spec.model_dump(mode="json"), "state": self.state()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> list[str]:
        """Save into ``directory``; returns the names of the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.save_files(directory)
        doc = {"format": 1, "spec": self.spec.model_dump(mode="json"), "state": self.state()}
        (directory / TOKENIZER_FILE).write_text(json.dumps(doc, ensure_ascii=False))
        return [TOKENIZER_FILE, *files]


def load_tokenizer(directory: str | Path, registry=None) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save` (needs no torch)."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise RunError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        spec_data = doc["spec"]
        state = doc["state"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path} is not a gptkit tokenizer file: {exc}") from None
    if registry is None:
        from gptkit.registry import load_registry

        registry = load_registry()
    cls = registry.get("tokenizer", spec_data.get("kind"))
    tok = cls.model_validate(spec_data).build()
    tok.load_state(state, directory)
    return tok


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One token per character seen in the training text, then the special tokens."""

    def __init__(self, spec: CharTokenizerSpec) -> None:
        super().__init__(spec)
        self.chars: list[str] = []
        self._ids: dict[str, int] = {}

    def _set_chars(self, chars: list[str]) -> None:
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    def fit(self, text: str) -> None:
        self._set_chars(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError:
            pass
        unseen = sorted({c for c in text if c not in ids})
        if self.spec.unknown == "skip":
            return self.encode_lenient(text)
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unseen[:5])
        raise DataError(
            f"text has {len(unseen)} character(s) the char tokenizer never saw: {shown}; "
            f"its vocabulary is the {len(self.chars)} characters of the training text",
            "Set tokenizer.unknown=skip to drop them, or use tokenizer: byte.",
        )

    def encode_lenient(self, text: str) -> list[int]:
        ids = self._ids
        return [ids[c] for c in text if c in ids]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def state(self) -> dict[str, Any]:
        return {"chars": "".join(self.chars)}

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        self._set_chars(list(state["chars"]))


class CharTokenizerSpec(TokenizerSpec):
    """Characters of the training text (nanoGPT's shakespeare_char), plus <|endoftext|>."""

    kind: Literal["char"] = "char"
    unknown: Literal["error", "skip"] = Field(
        "error", description="What to do with characters not seen in training."
    )

    def build(self) -> CharTokenizer:
        return CharTokenizer(self)


# --------------------------------------------------------------------------- byte


class ByteTokenizer(Tokenizer):
    """The 256 UTF-8 byte values, then <|endoftext|>. Any text round-trips."""

    def __init__(self, spec: ByteTokenizerSpec) -> None:
        super().__init__(spec)
        self.eot_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class ByteTokenizerSpec(TokenizerSpec):
    """UTF-8 bytes: a fixed vocabulary of 257 that never meets an unknown character."""

    kind: Literal["byte"] = "byte"

    def build(self) -> ByteTokenizer:
        return ByteTokenizer(self)


@hookimpl
def gptkit_register_tokenizer(register):
    register(CharTokenizerSpec)
    register(ByteTokenizerSpec)
