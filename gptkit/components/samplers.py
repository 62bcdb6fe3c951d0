"""Samplers: greedy, temperature, top_k, top_p, min_p, typical. Numpy only, no torch.

Each one only decides which tokens stay in the running (``truncate``); the shared options
(temperature, repetition penalty, stop strings) live on ``SamplerSpec`` in ``base.py``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from gptkit.components.base import SamplerSpec
from gptkit.registry.hookspecs import hookimpl

NEG_INF = -np.inf


class GreedySpec(SamplerSpec):
    """Always the most likely token: deterministic, and prone to loops."""

    kind: Literal["greedy"] = "greedy"

    def sample(self, logits, rng, previous=None, states=None):
        return self.adjust(logits, previous).argmax(axis=-1).astype(np.int64)

    def probs(self, logits, previous=None, states=None):
        x = self.adjust(logits, previous)
        return (np.arange(x.shape[-1]) == x.argmax(axis=-1)[:, None]).astype(np.float64)


class TemperatureSpec(SamplerSpec):
    """The full distribution, sharpened or flattened by temperature."""

    kind: Literal["temperature"] = "temperature"


class TopKSpec(SamplerSpec):
    """Only the k most likely tokens (Fan et al., 2018)."""

    kind: Literal["top_k"] = "top_k"
    k: int = Field(50, gt=0, examples=[4])  # contract vocabulary: 12, so 4 truncates

    def truncate(self, logits):
        k = min(self.k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # (B, 1) k-th largest
        return np.where(logits < kth, NEG_INF, logits)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _keep_prefix(logits: np.ndarray, order: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens, taken in ``order``, until their probability adds up to p (at least one)."""
    probs = np.take_along_axis(_softmax(logits), order, axis=-1)
    before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, NEG_INF, logits)


class TopPSpec(SamplerSpec):
    """Nucleus sampling (Holtzman et al., 2020): the smallest set of most likely tokens whose
    probability reaches p."""

    kind: Literal["top_p"] = "top_p"
    p: float = Field(
        0.9, gt=0, le=1, examples=[0.5], description="Probability mass to keep, in (0, 1]."
    )

    def truncate(self, logits):
        return _keep_prefix(logits, np.argsort(-logits, axis=-1, kind="stable"), self.p)


class MinPSpec(SamplerSpec):
    """Tokens at least p times as likely as the most likely one (Nguyen et al., 2024)."""

    kind: Literal["min_p"] = "min_p"
    p: float = Field(
        0.05, gt=0, le=1, examples=[0.2], description="Fraction of the top probability, in (0, 1]."
    )

    def truncate(self, logits):
        # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p)
        floor = logits.max(axis=-1, keepdims=True) + np.log(self.p)
        return np.where(logits < floor, NEG_INF, logits)


class TypicalSpec(SamplerSpec):
    """Locally typical sampling (Meister et al., 2023): tokens whose surprise is closest to the
    distribution's entropy, until their probability reaches p."""

    kind: Literal["typical"] = "typical"
    p: float = Field(
        0.95, gt=0, le=1, examples=[0.5], description="Probability mass to keep, in (0, 1]."
    )

    def truncate(self, logits):
        probs = _softmax(logits)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(probs)
            entropy = -np.nansum(probs * logp, axis=-1, keepdims=True)
            score = np.abs(-logp - entropy)
        score = np.where(np.isfinite(score), score, np.inf)
        return _keep_prefix(logits, np.argsort(score, axis=-1, kind="stable"), self.p)


# The built-in samplers. Each computes every row on its own (no state, nothing shared between
# rows), so rows that each have their own random generator can be drawn in one call
# (``sample_each``): a row gets the same token as it would alone.
ROW_WISE: tuple[type[SamplerSpec], ...] = (
    GreedySpec,
    TemperatureSpec,
    TopKSpec,
    TopPSpec,
    MinPSpec,
    TypicalSpec,
)


@hookimpl
def gptkit_register_sampler(register):
    for spec in ROW_WISE:
        register(spec)
