"""A word-level tokenizer with ``<unk>``: torch-free (bundles load it without torch).

Text is split into words, runs of whitespace and single punctuation marks, so decoding joins
the pieces back exactly; pieces outside the fitted vocabulary become ``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from gptkit import plugin

PIECES = re.compile(r"\w+|\s+|[^\w\s]", re.UNICODE)
UNK = "<unk>"


class WordTokenizer(plugin.Tokenizer):
    """Ids: 0 = ``<unk>``, 1 = end of text, then pieces by frequency."""

    def __init__(self, spec: WordTokenizerSpec) -> None:
        super().__init__(spec)
        self.spec: WordTokenizerSpec = spec
        self._set_vocab([])

    def _set_vocab(self, pieces: list[str]) -> None:
        self.pieces = [UNK, plugin.EOT, *pieces]
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        self.unk_id, self.eot_id = 0, 1
        self.vocab_size = len(self.pieces)

    def fit(self, text: str) -> None:
        counts = Counter(PIECES.findall(text))
        kept = [
            p for p, n in counts.most_common(self.spec.max_vocab - 2) if n >= self.spec.min_count
        ]
        self._set_vocab(sorted(kept, key=lambda p: (-counts[p], p)))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(p, self.unk_id) for p in PIECES.findall(text)]

    def encode_lenient(self, text: str) -> list[int]:
        return self.encode(text)  # unknown pieces are <unk> anyway

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.pieces)
        return "".join(self.pieces[i] for i in ids if 0 <= i < n and i != self.eot_id)

    def state(self) -> dict[str, Any]:
        return {"pieces": self.pieces[2:]}

    def load_state(self, state: dict[str, Any], directory: Path) -> None:
        self._set_vocab(list(state["pieces"]))


class WordTokenizerSpec(plugin.TokenizerSpec):
    """Words, whitespace runs and punctuation as tokens, the most frequent ``max_vocab`` of
    them; anything else is ``<unk>``."""

    kind: Literal["word"] = "word"
    max_vocab: int = Field(8192, ge=3, description="Vocabulary size cap (<unk> and eot included).")
    min_count: int = Field(1, ge=1, description="Drop pieces seen fewer times than this.")

    def build(self) -> WordTokenizer:
        return WordTokenizer(self)
