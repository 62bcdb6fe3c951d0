"""The torch part of gptkit-qknorm, imported only when the model is built."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptkit.plugin import CausalSelfAttention


class QKNormAttention(CausalSelfAttention):
    """Causal attention whose queries and keys are RMS-normalised per head."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)  # over head_dim, the last axis
