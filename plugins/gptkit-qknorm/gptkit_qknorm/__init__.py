"""QK-normalised attention: RMS-normalise each head's queries and keys before the dot product.

Used by the modern nanoGPT speedrun recipes: with unit-scale queries and keys the attention
logits cannot blow up, so higher learning rates stay stable. A learned per-channel gain keeps
the model free to sharpen attention again.

This module (the entry point) is torch-free, as gptkit requires: it is imported by every
command, torch-free bundle commands included. The torch module is in ``modules.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptkit.plugin import AttentionSpec, hookimpl

__version__ = "0.1.0"


class QKNormSpec(AttentionSpec):
    """Multi-head (or grouped-query) attention with RMS-normalised queries and keys."""

    kind: Literal["qk_norm"] = "qk_norm"
    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads; default n_heads.")
    eps: float = Field(1e-6, gt=0)

    def check(self, model):
        if self.n_kv_heads and model.n_heads % self.n_kv_heads:
            return [
                (
                    "n_kv_heads",
                    f"n_heads ({model.n_heads}) must be divisible by "
                    f"n_kv_heads ({self.n_kv_heads})",
                )
            ]
        return []

    def build(self, model, *, positional):
        from gptkit_qknorm.modules import QKNormAttention  # torch only when building

        return QKNormAttention(
            model.d_model,
            model.n_heads,
            self.n_kv_heads or model.n_heads,
            model.dropout,
            model.bias,
            positional,
            eps=self.eps,
        )


@hookimpl
def gptkit_register_attention(register):
    register(QKNormSpec)
