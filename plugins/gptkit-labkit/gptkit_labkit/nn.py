"""The torch modules of gptkit-labkit, imported by ``build`` only."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptkit.plugin import CausalSelfAttention, PositionalEncoding


class TalkingHeadsAttention(CausalSelfAttention):
    """Multi-head attention whose heads exchange information: scores are mixed across heads
    (H x H) before the softmax and weights after it (Shazeer et al., 2020)."""

    def __init__(
        self, d_model: int, n_heads: int, dropout: float, bias: bool, positional: PositionalEncoding
    ) -> None:
        super().__init__(d_model, n_heads, n_heads, dropout, bias, positional, fused=False)
        # Identity at init: the model starts as plain multi-head attention. (The GPT leaves a
        # component's own initialisation alone.)
        self.pre_mix = nn.Parameter(torch.eye(n_heads))
        self.post_mix = nn.Parameter(torch.eye(n_heads))

    def forward(self, x, positions, past=None, key_mask=None):
        B, T, C = x.shape
        H, hd = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).split([C, C, C], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, H, hd).transpose(1, 2)
        v = v.view(B, T, H, hd).transpose(1, 2)
        q, k = self.positional.rotate(q, k, positions)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, T_past + T, hd)
            v = torch.cat([past[1], v], dim=2)
        T_all = k.size(2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, T, T_all)
        bias = self.positional.score_bias(T, T_all)
        if bias is not None:
            scores = scores + bias
        scores = torch.einsum("bhqk,hg->bgqk", scores, self.pre_mix)  # heads talk
        allowed = self.allowed(T, T_all, key_mask, x.device)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        weights = torch.einsum("bhqk,hg->bgqk", weights, self.post_mix)
        weights = nn.functional.dropout(weights, p=self.dropout, training=self.training)
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.out_proj(y)), (k, v)


class T5RelativeBias(PositionalEncoding):
    """A learned scalar per head per bucket of (query - key) distance, added to the scores."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, n_heads)
        nn.init.normal_(self.table.weight, std=0.02)

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        """Causal buckets: exact for distances below half the buckets, log-spaced beyond."""
        exact = self.num_buckets // 2
        d = distance.clamp(min=0)
        far = exact + (
            torch.log(d.float().clamp(min=1) / exact)
            / math.log(self.max_distance / exact)
            * (self.num_buckets - exact)
        ).to(torch.long)
        far = far.clamp(max=self.num_buckets - 1)
        return torch.where(d < exact, d, far)

    def score_bias(self, q_len: int, k_len: int) -> torch.Tensor:
        device = self.table.weight.device
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        bias = self.table(self.bucket(q_pos - k_pos))  # (Tq, Tk, H)
        return bias.permute(2, 0, 1)[None]  # (1, H, Tq, Tk)
