"""Positional schemes: learned, sinusoidal, rope, alibi, none.

A ``PositionalEncoding`` can act in three places, and each scheme uses one of them:

- ``embed(positions)``: a vector added to the token embeddings (learned, sinusoidal);
- ``rotate(q, k, positions)``: a rotation of queries and keys (rope);
- ``score_bias(q_len, k_len)``: a bias added to attention scores (alibi).

Every method takes the *absolute* positions (or lengths) of the tokens it sees, so the same
code serves training, a prefill, and one-token decode steps through the KV cache.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from gptkit.components.base import PositionalSpec
from gptkit.registry.hookspecs import hookimpl


class PositionalEncoding(nn.Module):
    """Base class: does nothing in all three places. Subclasses override what they need."""

    def embed(self, positions: torch.Tensor) -> torch.Tensor | None:
        """(B, T) positions -> (B, T, d_model) vectors to add to the input, or None."""
        return None

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, T, hd), k: (B, H_kv, T, hd), positions: (B, T) -> rotated q, k."""
        return q, k

    def score_bias(self, q_len: int, k_len: int) -> torch.Tensor | None:
        """Bias (1, H, q_len, k_len) for queries at k_len-q_len .. k_len-1 over keys
        0 .. k_len-1."""
        return None

    def score_bias_at(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor | None:
        """The same bias for queries and keys at the given indices (1-D tensors): what the
        static KV cache uses, where keys are cache slots followed by the new tokens. A scheme
        that overrides ``score_bias`` must override this too to use the static cache (without
        it, gptkit decodes with the concatenating cache)."""
        return None

    @property
    def static_cache(self) -> bool:
        """Whether this scheme works with the static KV cache."""
        cls = type(self)
        return (
            cls.score_bias is PositionalEncoding.score_bias
            or cls.score_bias_at is not PositionalEncoding.score_bias_at
        )


class LearnedPositionalEmbedding(PositionalEncoding):
    """A trained vector per position, as in GPT-2. Cannot go past ``max_seq_len``."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max_seq_len, d_model)
        nn.init.normal_(self.table.weight, mean=0.0, std=0.02)  # GPT-2's

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)


class SinusoidalPositionalEmbedding(PositionalEncoding):
    """Fixed sines and cosines of geometrically spaced frequencies (Vaswani et al., 2017)."""

    def __init__(self, d_model: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (d_model/2,)

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # (B, T, d_model/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, T, d_model)


class RotaryEmbedding(PositionalEncoding):
    """Rotary position embedding (RoPE, Su et al., 2021), in the "rotate half" layout.

    Each pair of channels (i, i + hd/2) of a query or key is rotated by an angle proportional
    to its position, so the dot product of a query and a key depends only on their distance.
    Keys are rotated before they enter the KV cache, so cached keys never need touching again.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)

    def rotate(self, q, k, positions):
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # (B, T, hd/2)
        cos = angles.cos()[:, None].to(q.dtype)  # (B, 1, T, hd/2): broadcast over heads
        sin = angles.sin()[:, None].to(q.dtype)
        return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ALiBi(PositionalEncoding):
    """Attention with linear biases (Press et al., 2022): no embedding at all; each head
    penalises a key in proportion to its distance from the query, with its own slope."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)  # (H,)

    def score_bias(self, q_len: int, k_len: int) -> torch.Tensor:
        device = self.slopes.device
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        distance = (q_pos - k_pos).clamp(min=0).to(self.slopes.dtype)  # future keys are masked
        return -(self.slopes[:, None, None] * distance)[None]  # (1, H, Tq, Tk)

    def score_bias_at(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        distance = (q_idx[:, None] - k_idx[None, :]).clamp(min=0).to(self.slopes.dtype)
        return -(self.slopes[:, None, None] * distance)[None]  # (1, H, Tq, Tk)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, with its rule for head counts that are not a
    power of two (take the slopes of the next power down, then every other one of the next up)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


class NoPositionalEncoding(PositionalEncoding):
    """No position information beyond what the causal mask implies (NoPE)."""


# --------------------------------------------------------------------------- specs


class LearnedSpec(PositionalSpec):
    """A trained embedding per position (GPT-2)."""

    kind: Literal["learned"] = "learned"

    def build(self, model):
        return LearnedPositionalEmbedding(model.max_seq_len, model.d_model)


class SinusoidalSpec(PositionalSpec):
    """Fixed sinusoidal embedding added to the input."""

    kind: Literal["sinusoidal"] = "sinusoidal"
    base: float = Field(10000.0, gt=1.0)

    def check(self, model):
        return (
            []
            if model.d_model % 2 == 0
            else [("kind", f"needs an even d_model, got {model.d_model}")]
        )

    def build(self, model):
        return SinusoidalPositionalEmbedding(model.d_model, self.base)


class RoPESpec(PositionalSpec):
    """Rotary embedding of queries and keys."""

    kind: Literal["rope"] = "rope"
    theta: float = Field(10000.0, gt=1.0, description="Base of the rotation frequencies.")

    def check(self, model):
        if model.head_dim % 2:
            return [("kind", f"rope needs an even head size; d_model/n_heads = {model.head_dim}")]
        return []

    def build(self, model):
        return RotaryEmbedding(model.head_dim, self.theta)


class ALiBiSpec(PositionalSpec):
    """Linear distance penalties on attention scores."""

    kind: Literal["alibi"] = "alibi"

    def build(self, model):
        return ALiBi(model.n_heads)


class NoPositionalSpec(PositionalSpec):
    """No positional information."""

    kind: Literal["none"] = "none"

    def build(self, model):
        return NoPositionalEncoding()


@hookimpl
def gptkit_register_positional(register):
    for spec in (LearnedSpec, SinusoidalSpec, RoPESpec, ALiBiSpec, NoPositionalSpec):
        register(spec)
