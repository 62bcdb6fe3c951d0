"""A tokenizer and a sampler whose module imports torch at the top: both work, but a bundle
loaded without torch cannot import them (gptkit.testing's torch_free property must fail them).
"""

from __future__ import annotations

from typing import Literal

import torch

from gptkit.components.tokenizers import CharTokenizerSpec
from gptkit.plugin import SamplerSpec, hookimpl

__version__ = "0.0.1"


class TorchCharSpec(CharTokenizerSpec):
    kind: Literal["torch_char"] = "torch_char"  # type: ignore[assignment]


class TorchSoftmaxSpec(SamplerSpec):
    """Computes its distribution with torch."""

    kind: Literal["torch_softmax"] = "torch_softmax"

    def probs(self, logits, previous=None, states=None):
        x = torch.from_numpy(self.truncate(self.adjust(logits, previous)))
        return x.softmax(-1).numpy()


@hookimpl
def gptkit_register_tokenizer(register):
    register(TorchCharSpec)


@hookimpl
def gptkit_register_sampler(register):
    register(TorchSoftmaxSpec)
