"""Deliberately broken components, one per contract property that must catch them.

Each looks plausible and trains; ``gptkit.testing`` must fail it
(tests/testing/test_plugin_contract.py).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from rare_chars import ThresholdCharSpec, ThresholdCharTokenizer

from gptkit.components.attention import CausalSelfAttention, StaticKV
from gptkit.components.optimizers import AdamWSpec
from gptkit.components.positional import RoPESpec, RotaryEmbedding
from gptkit.components.samplers import TopKSpec
from gptkit.components.tokenizers import CharTokenizer, CharTokenizerSpec
from gptkit.plugin import AttentionSpec, SamplerSpec, hookimpl, inverse_cdf

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


class ReinitsPositionalSpec(AttentionSpec):
    """Re-draws the positional scheme's weights it is handed (a "helpful" init)."""

    kind: Literal["reinits_positional"] = "reinits_positional"

    def build(self, model, *, positional):
        for p in positional.parameters():
            torch.nn.init.normal_(p, std=0.02)
        return _mha(CausalSelfAttention, model, positional)


class PositionalVandalAttention(CausalSelfAttention):
    """Correct attention that nudges the positional scheme's weights on every forward."""

    def forward(self, x, positions, past=None, key_mask=None):
        with torch.no_grad():
            for p in self.positional.parameters():
                p.mul_(0.999)
        return super().forward(x, positions, past, key_mask)


class PositionalVandalSpec(AttentionSpec):
    kind: Literal["positional_vandal"] = "positional_vandal"

    def build(self, model, *, positional):
        return _mha(PositionalVandalAttention, model, positional)


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


class FreeSlotsAttention(CausalSelfAttention):
    """Right when the static cache is read as its slots in use, wrong over its whole buffers
    (the exported graph's step, a CUDA graph's): it takes every slot as in use and ignores
    ``key_mask`` there, so it attends to the free slots."""

    def attend_static(self, q, k, v, past: StaticKV, key_mask):
        every = torch.full_like(past.position, past.keys.size(2))
        return super().attend_static(q, k, v, past._replace(position=every, shared=None), None)


class FreeSlotsSpec(AttentionSpec):
    kind: Literal["free_slots"] = "free_slots"

    def build(self, model, *, positional):
        return _mha(FreeSlotsAttention, model, positional)


class HostSlicingAttention(CausalSelfAttention):
    """Correct, but reads the cache's first free slot on the host to slice the slots in use
    (``int(past.position)``): a decode step that cannot be captured as a CUDA graph."""

    def used(self, past: StaticKV) -> int:
        return int(past.position)

    def attend_static(self, q, k, v, past: StaticKV, key_mask):
        used = self.used(past)
        if key_mask is not None:
            key_mask = torch.cat([key_mask[:, :used], key_mask[:, past.keys.size(2) :]], dim=1)
        sliced = past._replace(keys=past.keys[:, :, :used], values=past.values[:, :, :used])
        return super().attend_static(q, k, v, sliced, key_mask)


class HostSlicingSpec(AttentionSpec):
    kind: Literal["host_slicing"] = "host_slicing"

    def build(self, model, *, positional):
        return _mha(HostSlicingAttention, model, positional)


class HostListingAttention(HostSlicingAttention):
    """As ``HostSlicingAttention``, but reads the first free slot by copying it to the host
    (``past.position.tolist()``), which the dispatcher does not see on the CPU."""

    def used(self, past: StaticKV) -> int:
        return past.position.reshape(1).tolist()[0]


class HostListingSpec(AttentionSpec):
    kind: Literal["host_listing"] = "host_listing"

    def build(self, model, *, positional):
        return _mha(HostListingAttention, model, positional)


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


class TransposedCacheAttention(CausalSelfAttention):
    """Keeps its cache as (B, T, H, hd) instead of (B, H_kv, T, hd). Self-consistent (it
    transposes back before use), but gptkit's decoding loop joins and pads caches on dim 2."""

    def forward(self, x, positions, past=None, key_mask=None):
        if past is not None:
            past = (past[0].transpose(1, 2), past[1].transpose(1, 2))
        y, (k, v) = super().forward(x, positions, past, key_mask)
        return y, (k.transpose(1, 2), v.transpose(1, 2))


class TransposedCacheSpec(AttentionSpec):
    kind: Literal["transposed_cache"] = "transposed_cache"

    def build(self, model, *, positional):
        return _mha(TransposedCacheAttention, model, positional)


class LastOnlyAttention(CausalSelfAttention):
    """Returns the last position's output only, (B, 1, C): the residual add broadcasts it."""

    def forward(self, x, positions, past=None, key_mask=None):
        y, present = super().forward(x, positions, past, key_mask)
        return y[:, -1:, :], present


class LastOnlySpec(AttentionSpec):
    kind: Literal["last_only"] = "last_only"

    def build(self, model, *, positional):
        return _mha(LastOnlyAttention, model, positional)


class UnusedGateAttention(CausalSelfAttention):
    """Registers a per-head gate that forward never applies: training never updates it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gate = torch.nn.Parameter(torch.ones(self.n_heads))


class UnusedGateSpec(AttentionSpec):
    kind: Literal["unused_gate"] = "unused_gate"

    def build(self, model, *, positional):
        return _mha(UnusedGateAttention, model, positional)


class RestartingRotary(RotaryEmbedding):
    """Rotates by each token's index in the current call (0, 1, ...) instead of its position:
    right for a full forward, wrong for every token decoded through the cache."""

    def rotate(self, q, k, positions):
        restarted = torch.arange(q.size(2), device=q.device).expand(q.size(0), -1)
        return super().rotate(q, k, restarted)


class RestartingRoPESpec(RoPESpec):
    kind: Literal["restarting_rope"] = "restarting_rope"  # type: ignore[assignment]

    def build(self, model):
        return RestartingRotary(model.head_dim, self.theta)


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


class OwnRngSpec(SamplerSpec):
    """Draws from a generator of its own, made afresh each step: deterministic, but the
    caller's seed changes nothing."""

    kind: Literal["own_rng"] = "own_rng"

    def sample(self, logits, rng, previous=None, states=None):
        return inverse_cdf(self.probs(logits, previous, states), np.random.default_rng(0))


class VocabSizedIdSpec(SamplerSpec):
    """Returns the vocabulary size (as if it were an end-of-text id): past the last token."""

    kind: Literal["vocab_sized_id"] = "vocab_sized_id"

    def sample(self, logits, rng, previous=None, states=None):
        return np.full(len(logits), logits.shape[-1], dtype=np.int64)


class NegativeIdSpec(SamplerSpec):
    """Returns -1 (a "no token" sentinel) for every row."""

    kind: Literal["negative_id"] = "negative_id"

    def sample(self, logits, rng, previous=None, states=None):
        return np.full(len(logits), -1, dtype=np.int64)


_SHARED_STATE: dict = {"steps": 0}


class SharedStateSpec(SamplerSpec):
    """Hands every row (and every generation) the same state object."""

    kind: Literal["shared_state"] = "shared_state"

    def new_state(self):
        return _SHARED_STATE


class DrawsUntruncatedSpec(TopKSpec):
    """Reports top-k probabilities but draws from the whole softmax."""

    kind: Literal["draws_untruncated"] = "draws_untruncated"  # type: ignore[assignment]

    def sample(self, logits, rng, previous=None, states=None):
        x = self.adjust(logits, previous)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p])


class TopKPlusOneSpec(TopKSpec):
    """Overrides only ``truncate``, keeping k + 1 tokens: its draws follow its own probs()."""

    kind: Literal["top_k_plus_one"] = "top_k_plus_one"  # type: ignore[assignment]

    def truncate(self, logits):
        return TopKSpec(k=self.k + 1).truncate(logits)


class RescalingSpec(SamplerSpec):
    """A new kind whose ``truncate`` keeps the upper half of the tokens but also sharpens
    them (doubles their logits): a truncation may only remove tokens."""

    kind: Literal["rescaling"] = "rescaling"

    def truncate(self, logits):
        median = np.median(logits, axis=-1, keepdims=True)
        return np.where(logits >= median, 2 * logits, -np.inf)


class HalfMassSpec(SamplerSpec):
    """Its own ``probs`` forgets to normalise: each row sums to one half."""

    kind: Literal["half_mass"] = "half_mass"

    def probs(self, logits, previous=None, states=None):
        return 0.5 * super().probs(logits, previous, states)


class ColdSpec(SamplerSpec):
    """Its own ``probs``: the softmax of the raw logits, so ``temperature`` (and the
    repetition penalty) change nothing."""

    kind: Literal["cold"] = "cold"

    def probs(self, logits, previous=None, states=None):
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


class ForgivingSpec(SamplerSpec):
    """Its own ``adjust`` applies the temperature and forgets the repetition penalty."""

    kind: Literal["forgiving"] = "forgiving"

    def adjust(self, logits, previous=None):
        return np.asarray(logits, dtype=np.float64) / self.temperature


class WideTopKSpec(TopKSpec):
    """Its example k is wider than the contract's vocabulary: truncation would go untested."""

    kind: Literal["wide_top_k"] = "wide_top_k"  # type: ignore[assignment]
    k: int = Field(100, gt=0, examples=[100])


class LossyTokenizer(CharTokenizer):
    """Lower-cases what it decodes: decode(encode(x)) != x."""

    def decode(self, ids):
        return super().decode(ids).lower()


class LossySpec(CharTokenizerSpec):
    kind: Literal["lossy"] = "lossy"  # type: ignore[assignment]

    def build(self):
        return LossyTokenizer(self)


class SqueezingTokenizer(CharTokenizer):
    """Decodes runs of spaces as one space: right on ordinary lines of the fitted text."""

    def decode(self, ids):
        text = super().decode(ids)
        while "  " in text:
            text = text.replace("  ", " ")
        return text


class SqueezingSpec(CharTokenizerSpec):
    kind: Literal["squeezing"] = "squeezing"  # type: ignore[assignment]

    def build(self):
        return SqueezingTokenizer(self)


class MostlyUnknownTokenizer(ThresholdCharTokenizer):
    """Keeps only characters seen 2,000 times: most of the text it was fitted on is unknown."""

    def fit(self, text):
        counts = Counter(text)
        self._set_chars(sorted(c for c, n in counts.items() if n >= 2000))


class MostlyUnknownSpec(ThresholdCharSpec):
    kind: Literal["mostly_unknown"] = "mostly_unknown"  # type: ignore[assignment]

    def build(self):
        return MostlyUnknownTokenizer(self)


class VanishingUnknownTokenizer(ThresholdCharTokenizer):
    """Declares unk_id but drops the characters it does not know instead of encoding them."""

    def encode(self, text):
        return [self._ids[c] for c in text if c in self._ids]


class VanishingUnknownSpec(ThresholdCharSpec):
    kind: Literal["vanishing_unknown"] = "vanishing_unknown"  # type: ignore[assignment]

    def build(self):
        return VanishingUnknownTokenizer(self)


class ReorderingTokenizer(CharTokenizer):
    """Numbers its characters by frequency when fitted, but saves them as a sorted set: a
    reloaded tokenizer has the same vocabulary and gives other ids."""

    def fit(self, text):
        counts = Counter(text)
        self._set_chars(sorted(counts, key=lambda c: (-counts[c], c)))

    def state(self):
        return {"chars": "".join(sorted(self.chars))}


class SetStateTokenizer(CharTokenizer):
    """Keeps its characters as a set in ``state()``: not JSON, so it cannot be saved."""

    def state(self):
        return {"chars": set(self.chars)}


class SetStateSpec(CharTokenizerSpec):
    kind: Literal["set_state"] = "set_state"  # type: ignore[assignment]

    def build(self):
        return SetStateTokenizer(self)


class ReorderingSpec(CharTokenizerSpec):
    kind: Literal["reordering"] = "reordering"  # type: ignore[assignment]

    def build(self):
        return ReorderingTokenizer(self)


class EotClashTokenizer(CharTokenizer):
    """Gives its end-of-text id to its first character (a newline in the fitted text): every
    generation stops at its first newline."""

    def _set_chars(self, chars):
        super()._set_chars(chars)
        self.eot_id, self.vocab_size = 0, len(chars)


class EotClashSpec(CharTokenizerSpec):
    kind: Literal["eot_clash"] = "eot_clash"  # type: ignore[assignment]

    def build(self):
        return EotClashTokenizer(self)


class DroppingTokenizer(CharTokenizer):
    """Has no unk_id, and drops the characters it never saw instead of refusing them."""

    def encode(self, text):
        return self.encode_lenient(text)


class DroppingSpec(CharTokenizerSpec):
    kind: Literal["dropping"] = "dropping"  # type: ignore[assignment]

    def build(self):
        return DroppingTokenizer(self)


class ShufflingTokenizer(CharTokenizer):
    """Numbers its characters in a random order each time it is fitted."""

    def fit(self, text):
        import random

        chars = sorted(set(text))
        random.Random().shuffle(chars)
        self._set_chars(chars)


class ShufflingSpec(CharTokenizerSpec):
    kind: Literal["shuffling"] = "shuffling"  # type: ignore[assignment]

    def build(self):
        return ShufflingTokenizer(self)


class FixedLrAdamW(torch.optim.Optimizer):
    """Plain Adam that keeps the lr it was built with: ignores the trainer's schedule
    (``gated``: except that an lr of 0 skips the step, so only the step size is wrong)."""

    def __init__(self, params, lr, gated=False):
        super().__init__(params, {"lr": lr})
        self.fixed_lr, self.gated = lr, gated

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if self.gated and group["lr"] == 0:
                continue
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


class LrGatedSpec(AdamWSpec):
    kind: Literal["lr_gated"] = "lr_gated"  # type: ignore[assignment]

    def build(self, model, *, lr):
        return FixedLrAdamW([p for p in model.parameters() if p.requires_grad], lr, gated=True)


class AscendingSpec(AdamWSpec):
    """A sign error: AdamW that climbs the gradient (follows the lr, and never descends)."""

    kind: Literal["ascending"] = "ascending"  # type: ignore[assignment]

    def build(self, model, *, lr):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, maximize=True)


class Moments:
    """An optimizer's per-parameter state kept as a Python object (pickled, not tensors)."""

    def __init__(self, p):
        self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)


class StepCountingAdam(torch.optim.Optimizer):
    """Adam with bias correction. ``objects``: keeps each parameter's moments in a
    :class:`Moments` object (a checkpoint needs pickle to load it); otherwise keeps the step
    count on the optimizer, outside ``state_dict()`` (a resumed one restarts its bias
    correction)."""

    def __init__(self, params, lr, objects):
        super().__init__(params, {"lr": lr})
        self.objects, self.t = objects, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.objects:
                    moments = self.state[p].setdefault("moments", Moments(p))
                    m, v = moments.m, moments.v
                else:
                    state = self.state[p]
                    if not state:
                        state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    m, v = state["m"], state["v"]
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                v.mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                m_hat, v_hat = m / (1 - 0.9**self.t), v / (1 - 0.99**self.t)
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + 1e-8))


class ObjectStateSpec(AdamWSpec):
    kind: Literal["object_state"] = "object_state"  # type: ignore[assignment]

    def build(self, model, *, lr):
        return StepCountingAdam(list(model.parameters()), lr, objects=True)


class UnsavedStepSpec(AdamWSpec):
    kind: Literal["unsaved_step"] = "unsaved_step"  # type: ignore[assignment]

    def build(self, model, *, lr):
        return StepCountingAdam(list(model.parameters()), lr, objects=False)


@hookimpl
def gptkit_register_attention(register):
    register(PeekingSpec)
    register(ForgetfulSpec)
    register(MaskIgnoringSpec)
    register(ShiftedStaticSpec)
    register(FreeSlotsSpec)
    register(HostSlicingSpec)
    register(HostListingSpec)
    register(NoExampleSpec)
    register(DecodeMaskDroppingSpec)
    register(FixedInitSpec)
    register(TransposedCacheSpec)
    register(LastOnlySpec)
    register(UnusedGateSpec)
    register(ReinitsPositionalSpec)
    register(PositionalVandalSpec)


@hookimpl
def gptkit_register_positional(register):
    register(RestartingRoPESpec)


@hookimpl
def gptkit_register_sampler(register):
    register(GlobalRngSpec)
    register(DrawsUntruncatedSpec)
    register(OwnRngSpec)
    register(SharedStateSpec)
    register(TopKPlusOneSpec)
    register(RescalingSpec)
    register(WideTopKSpec)
    register(HalfMassSpec)
    register(VocabSizedIdSpec)
    register(NegativeIdSpec)
    register(ColdSpec)
    register(ForgivingSpec)


@hookimpl
def gptkit_register_tokenizer(register):
    register(LossySpec)
    register(SqueezingSpec)
    register(ReorderingSpec)
    register(MostlyUnknownSpec)
    register(VanishingUnknownSpec)
    register(SetStateSpec)
    register(EotClashSpec)
    register(DroppingSpec)
    register(ShufflingSpec)


@hookimpl
def gptkit_register_optimizer(register):
    register(FixedLrSpec)
    register(LrGatedSpec)
    register(AscendingSpec)
    register(ObjectStateSpec)
    register(UnsavedStepSpec)
