"""Base spec classes, one per slot. A component is a pydantic model with a ``kind`` literal.

This module is torch-free: it only describes components. ``build`` imports what it needs.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ComponentSpec(BaseModel):
    """Base of every component spec: strict (unknown keys are errors), immutable, and its
    floats finite (``inf``/``nan`` are refused at validation, naming the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    slot: ClassVar[str] = ""
    kind: str

    @classmethod
    def kind_name(cls) -> str:
        """The name this class registers under: the value of its ``kind`` Literal."""
        field = cls.model_fields.get("kind")
        args = typing.get_args(field.annotation) if field is not None else ()
        origin = typing.get_origin(field.annotation) if field is not None else None
        if origin is not typing.Literal or len(args) != 1 or not isinstance(args[0], str):
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__} must declare kind: Literal['name'] = 'name'"
            )
        return args[0]

    def check(self, model: Any) -> list[tuple[str, str]]:
        """Cross-field checks against the enclosing ``ModelSpec``: (field, message) pairs."""
        return []

    def build(self, **kwargs: Any) -> Any:  # pragma: no cover - every slot overrides it
        raise NotImplementedError


class AttentionSpec(ComponentSpec):
    """Attention variant. ``build(d_model=, n_heads=, max_seq_len=, dropout=, bias=, positional=)``."""

    slot: ClassVar[str] = "attention"


class PositionalSpec(ComponentSpec):
    """Positional scheme. ``build(d_model=, n_heads=, head_dim=, max_seq_len=)``."""

    slot: ClassVar[str] = "positional"


class TokenizerSpec(ComponentSpec):
    """Tokenizer. ``build()`` returns an unfitted tokenizer."""

    slot: ClassVar[str] = "tokenizer"

    def fingerprint(self) -> str:
        """Anything besides the fields that changes the result (e.g. a file's hash)."""
        return ""


class SamplerSpec(ComponentSpec):
    """Sampler: picks the next token from a numpy array of logits.

    The options here are honoured by every sampler. A subclass narrows the distribution in
    :meth:`truncate` (or replaces :meth:`sample` outright, as greedy does). ``build()`` returns
    the spec itself: it is immutable, and the random state lives in the generator passed in.
    """

    slot: ClassVar[str] = "sampler"
    temperature: float = Field(
        1.0, gt=0, description="Divide logits by this; below 1 sharpens. Use greedy for 0."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="Penalise tokens already generated (CTRL); 1 = off."
    )
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = Field(default_factory=list, description="Stop at any of these strings.")
    stop_at_eot: bool = Field(True, description="Stop at the end-of-text token.")

    @field_validator("temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and value == 0:
            raise ValueError("temperature must be > 0; for deterministic output use sampler.kind=greedy")
        return value

    def build(self) -> SamplerSpec:
        return self

    def truncate(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) float64 logits -> the same with excluded tokens set to -inf."""
        return logits

    def adjust(self, logits: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """Repetition penalty then temperature: (B, V) -> (B, V) float64."""
        x = np.array(logits, dtype=np.float64)
        if self.repetition_penalty != 1.0 and previous is not None and previous.size:
            rows = np.arange(x.shape[0])[:, None]
            seen = x[rows, previous]
            x[rows, previous] = np.where(
                seen > 0, seen / self.repetition_penalty, seen * self.repetition_penalty
            )
        return x / self.temperature

    def probs(self, logits: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """The distribution this sampler draws from: (B, V) probabilities."""
        x = self.truncate(self.adjust(logits, previous))
        x = x - x.max(axis=-1, keepdims=True)
        p = np.exp(x)
        return p / p.sum(axis=-1, keepdims=True)

    def sample(
        self,
        logits: np.ndarray,
        rng: np.random.Generator,
        previous: np.ndarray | None = None,
    ) -> np.ndarray:
        """Draw one token per row: logits (B, V), previous tokens (B, t) -> ids (B,).

        One uniform number per row, inverted through the cumulative distribution, so the same
        seed and the same logits give the same tokens in torch and onnxruntime.
        """
        p = self.probs(logits, previous)
        cdf = np.cumsum(p, axis=-1)
        u = rng.random(p.shape[0])[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), p.shape[-1] - 1).astype(np.int64)


class OptimizerSpec(ComponentSpec):
    """Optimizer. ``build(model, lr=)`` returns a ``torch.optim.Optimizer`` over the model's parameters."""

    slot: ClassVar[str] = "optimizer"


SLOT_BASES: dict[str, type[ComponentSpec]] = {
    cls.slot: cls
    for cls in (AttentionSpec, PositionalSpec, TokenizerSpec, SamplerSpec, OptimizerSpec)
}
