"""QK-normalised attention: RMS-normalise each head's queries and keys before the dot product.

Used by the modern nanoGPT speedrun recipes: with unit-scale queries and keys the attention
logits cannot blow up, so higher learning rates stay stable. A learned per-channel gain keeps
the model free to sharpen attention again.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from gptkit import hookimpl
from gptkit.components.attention import CausalSelfAttention
from gptkit.components.base import AttentionSpec

__version__ = "0.1.0"


class QKNormAttention(CausalSelfAttention):
    """Causal attention whose queries and keys are RMS-normalised per head."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)  # over head_dim, the last axis


class QKNormSpec(AttentionSpec):
    """Multi-head (or grouped-query) attention with RMS-normalised queries and keys."""

    kind: Literal["qk_norm"] = "qk_norm"
    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads; default n_heads.")
    eps: float = Field(1e-6, gt=0)

    def check(self, model):
        if self.n_kv_heads and model.n_heads % self.n_kv_heads:
            return [("n_kv_heads", f"n_heads ({model.n_heads}) must be divisible by "
                                   f"n_kv_heads ({self.n_kv_heads})")]
        return []

    def build(self, *, d_model, n_heads, max_seq_len, dropout, bias, positional):
        return QKNormAttention(d_model, n_heads, self.n_kv_heads or n_heads, dropout, bias,
                               positional, eps=self.eps)


@hookimpl
def gptkit_register_attention(register):
    register(QKNormSpec)
