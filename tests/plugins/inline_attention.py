"""A test plugin: an attention variant written from scratch, outside gptkit's own module.

It proves that a component registered through the hook is built into the model and gets the
registry-wide contract tests without writing any.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from gptkit.plugin import AttentionSpec, hookimpl, mark_residual

__version__ = "0.0.1"


class NaiveAttention(nn.Module):
    """Multi-head attention with a temperature on the scores, plain softmax, no fused kernel."""

    def __init__(self, d_model, n_heads, positional, score_scale):
        super().__init__()
        self.n_heads, self.hd = n_heads, d_model // n_heads
        self.score_scale = score_scale
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = mark_residual(nn.Linear(d_model, d_model, bias=False))
        for linear in (self.q, self.k, self.v, self.out_proj):
            nn.init.normal_(linear.weight, std=0.02)
        self.__dict__["positional"] = positional

    def forward(self, x, positions, past=None, key_mask=None):
        B, T, C = x.shape

        def heads(t):
            return t.view(B, T, self.n_heads, self.hd).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q, k = self.positional.rotate(q, k, positions)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        T_all = k.size(2)
        att = (q @ k.transpose(-2, -1)) * (self.score_scale / math.sqrt(self.hd))
        bias = self.positional.score_bias(T, T_all)
        if bias is not None:
            att = att + bias
        q_idx = torch.arange(T_all - T, T_all)[:, None]
        k_idx = torch.arange(T_all)[None, :]
        allowed = (k_idx <= q_idx)[None, None]
        if key_mask is not None:
            allowed = (allowed & key_mask[:, None, None, :]) | (k_idx == q_idx)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y), (k, v)


class NaiveAttentionSpec(AttentionSpec):
    """Plain attention with a score temperature."""

    kind: Literal["naive"] = "naive"
    score_scale: float = Field(1.0, gt=0)

    def build(self, model, *, positional):
        return NaiveAttention(model.d_model, model.n_heads, positional, self.score_scale)


@hookimpl
def gptkit_register_attention(register):
    register(NaiveAttentionSpec)
