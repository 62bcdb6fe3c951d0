"""Eta sampling (Hewitt, Manning & Liang, 2022): drop tokens less likely than an
entropy-dependent threshold, eta = min(epsilon, sqrt(epsilon) * exp(-entropy)).

A flat (high-entropy) distribution gets a low threshold and keeps many tokens; a peaked one
keeps few. Numpy only, so it runs in the torch generator and the onnxruntime runtime alike.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from gptkit.plugin import SamplerSpec, hookimpl

__version__ = "0.1.0"


class EtaSpec(SamplerSpec):
    """Truncation sampling with an entropy-adaptive threshold."""

    kind: Literal["eta"] = "eta"
    epsilon: float = Field(9e-4, gt=0, lt=1, description="Upper bound of the threshold.")

    def threshold(self, probs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.nansum(
                np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1, keepdims=True
            )
        return np.minimum(self.epsilon, np.sqrt(self.epsilon) * np.exp(-entropy))

    def truncate(self, logits: np.ndarray) -> np.ndarray:
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        keep = probs > self.threshold(probs)
        keep[np.arange(len(probs)), probs.argmax(axis=-1)] = True  # never drop everything
        return np.where(keep, logits, -np.inf)


@hookimpl
def gptkit_register_sampler(register):
    register(EtaSpec)
