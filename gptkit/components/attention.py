"""Causal self-attention with a KV cache: mha, gqa (and MQA), sliding_window.

All three are one module, ``CausalSelfAttention``, with different head and window settings:
multi-head attention is grouped-query attention with as many key/value heads as query heads.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from gptkit.components.base import AttentionSpec, mark_residual
from gptkit.components.positional import PositionalEncoding
from gptkit.registry.hookspecs import hookimpl

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, H_kv, T_past, hd) each


class StaticKV(NamedTuple):
    """One layer's view of a static (preallocated) KV cache, passed as ``past``.

    ``keys`` / ``values`` (B, H_kv, S, hd) hold S cache slots, of which the first ``position``
    are in use (slot j holds the token at index j of the left-padded batch); the new tokens
    are the ones at ``position`` .. ``position + T - 1``. ``key_mask`` is (B, S + T): the
    slots, then the new tokens. An attention that takes a ``StaticKV`` reads the cache without
    copying it and returns only the new tokens' (keys, values): the caller writes them into
    its buffers in place. A module says it can by ``static_cache = True`` (see
    :func:`supports_static_cache`); otherwise gptkit decodes with the concatenating cache.
    """

    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor  # () int64
    # Shared by every layer's view in one forward (or None): the score mask, made by the first
    # layer that needs it, is taken from here by the others (one decode step of the baby GPT
    # built it six times: ~70 of its ~390 small ops, each a kernel launch on a GPU).
    shared: dict | None = None


def supports_static_cache(module: nn.Module) -> bool:
    """Whether an attention module takes a ``StaticKV`` past. A subclass of
    ``CausalSelfAttention`` that replaces ``forward`` must declare ``static_cache`` itself."""
    if not getattr(module, "static_cache", False):
        return False
    cls = type(module)
    if isinstance(module, CausalSelfAttention) and cls.forward is not CausalSelfAttention.forward:
        return any("static_cache" in vars(c) for c in cls.__mro__ if c is not CausalSelfAttention)
    return True


class CausalSelfAttention(nn.Module):
    """Attention of each token over itself and the tokens before it.

    ``forward(x, positions, past, key_mask)``:

    - ``x``: (B, T, d_model), the new tokens; ``positions``: (B, T) their absolute positions;
    - ``past``: the cached (keys, values) of the T_past earlier tokens, or None;
    - ``key_mask``: (B, T_past + T) bool, False for padding (batches of uneven prompts), or None.

    Returns the output (B, T, d_model) and the cache extended by the new tokens. With a
    ``StaticKV`` past, returns the new tokens' (keys, values) only (see ``StaticKV``).
    """

    static_cache = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        dropout: float,
        bias: bool,
        positional: PositionalEncoding,
        window: int | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.fused = fused  # False: the plain softmax(QK^T)V path, used as a reference in tests
        self.dropout = dropout
        # Queries, keys and values in one matrix multiply: (d_model) -> (H + 2 * H_kv) * hd.
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        # Writes into the residual stream: the GPT gives it GPT-2's depth-scaled init.
        self.out_proj = mark_residual(nn.Linear(d_model, d_model, bias=bias))
        self.resid_dropout = nn.Dropout(dropout)
        # The positional scheme belongs to the GPT and is shared by every block; keep a plain
        # reference so its parameters are not registered (and saved) once per layer.
        self.__dict__["positional"] = positional
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
        for linear in (self.qkv, self.out_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        past: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, C = x.shape
        H, H_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, H_kv * hd, H_kv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, H_kv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, H_kv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = self.normalize_qk(q, k)
        q, k = self.positional.rotate(q, k, positions)
        if isinstance(past, StaticKV):
            y = self.attend_static(q, k, v, past, key_mask)  # (B, H, T, hd)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.out_proj(y)), (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H_kv, T_past + T, hd)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if H_kv != H:  # each group of H / H_kv query heads shares one key/value head
            k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, T_all, hd)
            v = v.repeat_interleave(H // H_kv, dim=1)

        T_all = k.size(2)
        bias = self.positional.score_bias(T, T_all)  # (1, H, T, T_all) or None
        dropout_p = self.dropout if self.training else 0.0
        simple = past is None and key_mask is None and bias is None and self.window is None
        if self.fused and simple:
            # The common training case: the fused kernel with its own causal mask. (Its
            # is_causal mask is aligned top-left, which is only right when T == T_all.)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            allowed = self.allowed(T, T_all, key_mask, x.device)  # (B or 1, 1, T, T_all)
            if self.fused:
                mask = allowed
                if bias is not None:
                    mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, T, T_all)
                if bias is not None:
                    att = att + bias
                att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
                att = F.dropout(att, p=dropout_p, training=self.training)
                y = att @ v  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.out_proj(y)), present

    def attend_static(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past: StaticKV,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of the new queries over the cache slots and the new keys, without joining
        them: scores for both parts side by side (B, H, T, S + T), one softmax, then the
        weighted sum of each part's values. Query heads are grouped per key/value head, so the
        cache is never repeated for GQA either."""
        B, H, T, hd = q.shape
        H_kv, S = k.size(1), past.keys.size(2)
        G = H // H_kv
        qg = q.reshape(B, H_kv, G * T, hd)  # head h = kv_head * G + g
        s_cache = (qg @ past.keys.transpose(-2, -1)).view(B, H, T, S)
        s_new = (qg @ k.transpose(-2, -1)).view(B, H, T, T)
        scores = torch.cat([s_cache, s_new], dim=-1) / math.sqrt(hd)  # (B, H, T, S + T)
        q_idx, k_idx, bias = self._static_mask(past, T, S, key_mask, scores.dtype)
        position_bias = self.positional.score_bias_at(q_idx, k_idx)  # (1, H, T, S + T) or None
        if position_bias is not None:
            bias = bias + position_bias
        att = (scores + bias).softmax(dim=-1)
        p_cache = att[..., :S].reshape(B, H_kv, G * T, S)
        p_new = att[..., S:].reshape(B, H_kv, G * T, T)
        y = p_cache @ past.values + p_new @ v  # (B, H_kv, G * T, hd)
        return y.view(B, H, T, hd)

    def _static_mask(
        self, past: StaticKV, T: int, S: int, key_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new queries' and all keys' batch indices, and the mask as an additive bias (0 or
        -inf, (B or 1, 1, T, S + T)): made once per forward when ``past.shared`` is given."""
        key = ("static_mask", T, S, self.window, dtype)
        if past.shared is not None and key in past.shared:
            return past.shared[key]
        device = past.keys.device
        q_idx = past.position + torch.arange(T, device=device)  # (T,) index in the batch
        slots = torch.arange(S, device=device)
        k_idx = torch.cat([slots, q_idx])  # (S + T,)
        in_use = torch.cat([slots < past.position, torch.ones(T, dtype=torch.bool, device=device)])
        allowed = (k_idx[None, :] <= q_idx[:, None]) & in_use[None, :]  # (T, S + T)
        if self.window is not None:
            allowed = allowed & (q_idx[:, None] - k_idx[None, :] < self.window)
        allowed = allowed[None, None]
        if key_mask is not None:
            itself = torch.cat(
                [
                    torch.zeros(T, S, dtype=torch.bool, device=device),
                    torch.eye(T, dtype=torch.bool, device=device),
                ],
                dim=-1,
            )
            allowed = (allowed & key_mask[:, None, None, :].bool()) | itself
        # The mask as an additive bias (0 or -inf), made once for every head (and, exported,
        # for every layer): onnxruntime adds it to a long prompt's scores far faster than it
        # masks them with a broadcast Where (a 700-token prefill: ~210-230 -> ~170 ms).
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias = bias.masked_fill(~allowed, float("-inf"))
        if past.shared is not None:
            past.shared[key] = (q_idx, k_idx, bias)
        return q_idx, k_idx, bias

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for variants that transform queries and keys per head before positions are
        applied (e.g. QK-norm); the identity here."""
        return q, k

    def allowed(
        self, q_len: int, k_len: int, key_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Which keys each query may see: (B or 1, 1, q_len, k_len) bool.

        The queries are the last q_len of the k_len tokens. Causal: a key at or before the
        query; sliding window: fewer than ``window`` tokens back; padding keys never. A token
        always sees itself, so a padding query's softmax has something to normalise over.
        """
        q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
        k_idx = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        allowed = k_idx <= q_idx
        if self.window is not None:
            allowed = allowed & (q_idx - k_idx < self.window)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if key_mask is not None:
            allowed = (allowed & key_mask[:, None, None, :].bool()) | (k_idx == q_idx)
        return allowed


# --------------------------------------------------------------------------- specs


class MHASpec(AttentionSpec):
    """Causal multi-head attention (Vaswani et al., 2017)."""

    kind: Literal["mha"] = "mha"

    def build(self, model, *, positional):
        return CausalSelfAttention(
            model.d_model, model.n_heads, model.n_heads, model.dropout, model.bias, positional
        )


class GQASpec(AttentionSpec):
    """Grouped-query attention (Ainslie et al., 2023): fewer key/value heads than query heads,
    so the KV cache is smaller. ``n_kv_heads: 1`` is multi-query attention."""

    kind: Literal["gqa"] = "gqa"
    n_kv_heads: int = Field(
        2, gt=0, examples=[2], description="Key/value heads; must divide n_heads."
    )

    def check(self, model):
        if model.n_heads % self.n_kv_heads:
            return [
                (
                    "n_kv_heads",
                    f"n_heads ({model.n_heads}) must be divisible by "
                    f"n_kv_heads ({self.n_kv_heads})",
                )
            ]
        return []

    def build(self, model, *, positional):
        return CausalSelfAttention(
            model.d_model, model.n_heads, self.n_kv_heads, model.dropout, model.bias, positional
        )


class SlidingWindowSpec(AttentionSpec):
    """Local causal attention: each token sees only the last ``window`` tokens (itself included),
    as in Longformer and Mistral."""

    kind: Literal["sliding_window"] = "sliding_window"
    window: int = Field(
        64, gt=0, examples=[5], description="Tokens each query sees, itself included."
    )

    def check(self, model):
        if self.window > model.max_seq_len:
            return [
                ("window", f"window ({self.window}) must be <= max_seq_len ({model.max_seq_len})")
            ]
        return []

    def build(self, model, *, positional):
        return CausalSelfAttention(
            model.d_model,
            model.n_heads,
            model.n_heads,
            model.dropout,
            model.bias,
            positional,
            window=self.window,
        )


@hookimpl
def gptkit_register_attention(register):
    for spec in (MHASpec, GQASpec, SlidingWindowSpec):
        register(spec)
