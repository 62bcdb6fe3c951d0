"""Deliberately broken components, one per contract property that must catch them.

Each looks plausible and trains; ``gptkit.testing`` must fail it
(tests/testing/test_plugin_contract.py).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from gptkit.components.attention import CausalSelfAttention, StaticKV
from gptkit.components.optimizers import AdamWSpec
from gptkit.components.samplers import TopKSpec
from gptkit.components.tokenizers import CharTokenizer, CharTokenizerSpec
from gptkit.plugin import AttentionSpec, SamplerSpec, hookimpl

__version__ = "0.0.1"


class PeekingAttention(CausalSelfAttention):
    """Lets each query see one token ahead: the mask is shifted by one."""

    def allowed(self, q_len, k_len, key_mask, device):
        q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_idx = torch.arange(k_len, device=device)[None, :]
        return (k_idx <= q_idx + 1)[None, None]

    def forward(self, x, positions, past=None, key_mask=None):
        self.fused = False  # always the masked path, so the shifted mask is used
        B, T, C = x.shape
        H, hd = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, H * hd, H * hd], dim=-1)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(~self.allowed(T, k.size(2), key_mask, x.device), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y), (k, v)


class PeekingSpec(AttentionSpec):
    kind: Literal["peeking"] = "peeking"

    def build(self, model, *, positional):
        return PeekingAttention(
            model.d_model, model.n_heads, model.n_heads, model.dropout, model.bias, positional
        )


class ForgetfulCacheAttention(CausalSelfAttention):
    """Correct, except that once the cache holds more than 20 tokens it drops the first."""

    def forward(self, x, positions, past=None, key_mask=None):
        y, (k, v) = super().forward(x, positions, past, key_mask)
        if past is not None and k.size(2) > 20:
            k, v = k[:, :, 1:], v[:, :, 1:]
            if key_mask is not None:
                raise NotImplementedError
        return y, (k, v)


class ForgetfulSpec(AttentionSpec):
    kind: Literal["forgetful"] = "forgetful"

    def build(self, model, *, positional):
        return ForgetfulCacheAttention(
            model.d_model, model.n_heads, model.n_heads, model.dropout, model.bias, positional
        )


def _mha(cls, model, positional):
    return cls(model.d_model, model.n_heads, model.n_heads, model.dropout, model.bias, positional)


class MaskIgnoringAttention(CausalSelfAttention):
    """Correct without padding; ignores ``key_mask``, so left padding leaks into a row."""

    def forward(self, x, positions, past=None, key_mask=None):
        return super().forward(x, positions, past, None)


class MaskIgnoringSpec(AttentionSpec):
    kind: Literal["mask_ignoring"] = "mask_ignoring"

    def build(self, model, *, positional):
        return _mha(MaskIgnoringAttention, model, positional)


class ShiftedStaticAttention(CausalSelfAttention):
    """Correct with the concatenating cache; with the static cache it loses the first slot's
    values (reads zeros there), as an off-by-one in the slot bookkeeping would."""

    def attend_static(self, q, k, v, past: StaticKV, key_mask):
        values = past.values.clone()
        values[:, :, 0] = 0
        return super().attend_static(q, k, v, past._replace(values=values), key_mask)


class ShiftedStaticSpec(AttentionSpec):
    kind: Literal["shifted_static"] = "shifted_static"

    def build(self, model, *, positional):
        return _mha(ShiftedStaticAttention, model, positional)


class DecodeMaskDroppingAttention(CausalSelfAttention):
    """Honours ``key_mask`` on a prefill only: decoding through a cache ignores it, so a row
    that joined a running batch (its cache left-padded) attends to the padding."""

    def forward(self, x, positions, past=None, key_mask=None):
        return super().forward(x, positions, past, None if past is not None else key_mask)


class DecodeMaskDroppingSpec(AttentionSpec):
    kind: Literal["decode_mask_dropping"] = "decode_mask_dropping"

    def build(self, model, *, positional):
        return _mha(DecodeMaskDroppingAttention, model, positional)


class FixedInitAttention(CausalSelfAttention):
    """Initialises its weights from a fixed generator: every seed gives the same attention."""

    def __init__(self, *args):
        super().__init__(*args)
        self.out_proj.gptkit_residual = False  # so the GPT does not re-initialise it either
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class FixedInitSpec(AttentionSpec):
    kind: Literal["fixed_init"] = "fixed_init"

    def build(self, model, *, positional):
        return _mha(FixedInitAttention, model, positional)


class NoExampleSpec(AttentionSpec):
    """A required field without ``examples``: the contract cannot build it."""

    kind: Literal["no_example"] = "no_example"
    width: int

    def build(self, model, *, positional):
        return _mha(CausalSelfAttention, model, positional)


class GlobalRngSpec(SamplerSpec):
    """Samples with numpy's global RNG instead of the rng it is given."""

    kind: Literal["global_rng"] = "global_rng"

    def sample(self, logits, rng, previous=None, states=None):
        p = self.probs(logits, previous)
        return np.array([np.random.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


class DrawsUntruncatedSpec(TopKSpec):
    """Reports top-k probabilities but draws from the whole softmax."""

    kind: Literal["draws_untruncated"] = "draws_untruncated"  # type: ignore[assignment]

    def sample(self, logits, rng, previous=None, states=None):
        x = self.adjust(logits, previous)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p])


class LossyTokenizer(CharTokenizer):
    """Lower-cases what it decodes: decode(encode(x)) != x."""

    def decode(self, ids):
        return super().decode(ids).lower()


class LossySpec(CharTokenizerSpec):
    kind: Literal["lossy"] = "lossy"  # type: ignore[assignment]

    def build(self):
        return LossyTokenizer(self)


class FixedLrAdamW(torch.optim.Optimizer):
    """Plain Adam that keeps the lr it was built with: ignores the trainer's schedule."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.fixed_lr = lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["m"].mul_(0.9).add_(p.grad, alpha=0.1)
                state["v"].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                p.sub_(self.fixed_lr * state["m"] / (state["v"].sqrt() + 1e-8))


class FixedLrSpec(AdamWSpec):
    kind: Literal["fixed_lr"] = "fixed_lr"  # type: ignore[assignment]
    unused: float = Field(0.0)

    def build(self, model, *, lr):
        return FixedLrAdamW([p for p in model.parameters() if p.requires_grad], lr)


@hookimpl
def gptkit_register_attention(register):
    register(PeekingSpec)
    register(ForgetfulSpec)
    register(MaskIgnoringSpec)
    register(ShiftedStaticSpec)
    register(NoExampleSpec)
    register(DecodeMaskDroppingSpec)
    register(FixedInitSpec)


@hookimpl
def gptkit_register_sampler(register):
    register(GlobalRngSpec)
    register(DrawsUntruncatedSpec)


@hookimpl
def gptkit_register_tokenizer(register):
    register(LossySpec)


@hookimpl
def gptkit_register_optimizer(register):
    register(FixedLrSpec)
