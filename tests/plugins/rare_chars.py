"""A character tokenizer whose vocabulary is cut by frequency: characters seen fewer than
``min_count`` times in the training text encode to ``<unk>`` (``unk_id``). It keeps the
contract (tests/testing/test_plugin_contract.py): the round trip holds on fitted text without
those rare characters."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import Field

from gptkit.components.tokenizers import CharTokenizer, CharTokenizerSpec
from gptkit.plugin import hookimpl

__version__ = "0.0.1"

UNK = "\ufffd"


class ThresholdCharTokenizer(CharTokenizer):
    def fit(self, text):
        counts = Counter(text)
        self._set_chars(sorted(c for c, n in counts.items() if n >= self.spec.min_count))

    def _set_chars(self, chars):
        super()._set_chars(chars)
        self.unk_id = len(chars)
        self.eot_id = len(chars) + 1
        self.vocab_size = len(chars) + 2

    def encode(self, text):
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids):
        return "".join(UNK if i == self.unk_id else self.chars[i] for i in ids if i < self.eot_id)


class ThresholdCharSpec(CharTokenizerSpec):
    kind: Literal["threshold_char"] = "threshold_char"  # type: ignore[assignment]
    min_count: int = Field(20, ge=1, examples=[20])

    def build(self):
        return ThresholdCharTokenizer(self)


@hookimpl
def gptkit_register_tokenizer(register):
    register(ThresholdCharSpec)
