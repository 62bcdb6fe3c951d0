"""Mirostat v2 (Basu et al., 2021): sampling that steers the surprise of each token towards a
target ``tau``. Numpy only; its running threshold ``mu`` is per-generation state."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from gptkit import plugin


class MirostatSpec(plugin.SamplerSpec):
    """Keep tokens whose surprise (-log2 p) is at most ``mu``; after each token move ``mu`` by
    ``eta`` times the gap between its surprise and ``tau``. ``mu`` starts at ``2 * tau``."""

    kind: Literal["mirostat"] = "mirostat"
    tau: float = Field(5.0, gt=0, description="Target surprise in bits.")
    eta: float = Field(0.1, gt=0, le=1, description="Learning rate of mu.")

    def new_state(self) -> dict[str, float]:
        return {"mu": 2.0 * self.tau}

    def _mu(self, rows: int, states: list[Any] | None) -> np.ndarray:
        if not states or states[0] is None:
            return np.full((rows, 1), 2.0 * self.tau)
        return np.array([[s["mu"]] for s in states], dtype=np.float64)

    def _base_probs(self, logits: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        x = self.adjust(logits, previous)
        x = x - x.max(axis=-1, keepdims=True)
        p = np.exp(x)
        return p / p.sum(axis=-1, keepdims=True)

    def probs(self, logits, previous=None, states=None):
        p = self._base_probs(logits, previous)
        with np.errstate(divide="ignore"):
            surprise = -np.log2(p)
        keep = surprise <= self._mu(len(p), states)
        keep[np.arange(len(p)), p.argmax(axis=-1)] = True  # never drop everything
        q = np.where(keep, p, 0.0)
        return q / q.sum(axis=-1, keepdims=True)

    def sample(self, logits, rng, previous=None, states=None):
        tokens = plugin.inverse_cdf(self.probs(logits, previous, states), rng)
        if states and states[0] is not None:
            p = self._base_probs(logits, previous)
            chosen = p[np.arange(len(p)), tokens]
            for state, prob in zip(states, chosen):
                state["mu"] -= self.eta * (float(-np.log2(prob)) - self.tau)
        return tokens
