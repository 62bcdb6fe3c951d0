"""gptkit-labkit: one component per gptkit slot, registered through the ``gptkit`` entry point.

This module is what the entry point names, so it is imported by every gptkit command, the
torch-free bundle commands included: it holds only the spec classes. The torch modules are in
``nn.py`` and ``lion.py`` and are imported inside ``build``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptkit import plugin
from gptkit_labkit.mirostat import MirostatSpec
from gptkit_labkit.word import WordTokenizerSpec

__version__ = "0.1.0"


class TalkingHeadsSpec(plugin.AttentionSpec):
    """Talking-heads attention (Shazeer et al., 2020): learned head-to-head mixing of the
    attention scores before the softmax and of the weights after it (identity at init, so it
    starts as multi-head attention)."""

    kind: Literal["talking_heads"] = "talking_heads"

    def build(self, model, *, positional):
        from gptkit_labkit.nn import TalkingHeadsAttention

        return TalkingHeadsAttention(
            model.d_model, model.n_heads, model.dropout, model.bias, positional
        )


class T5BiasSpec(plugin.PositionalSpec):
    """T5's learned relative-position bias: one scalar per head per distance bucket, added to
    the attention scores (exact buckets for short distances, logarithmic ones further out)."""

    kind: Literal["t5_bias"] = "t5_bias"
    num_buckets: int = Field(32, gt=1, examples=[8], description="Distance buckets.")
    max_distance: int = Field(
        128, gt=1, examples=[24], description="Distances beyond this share the last bucket."
    )

    def check(self, model):
        if self.max_distance < self.num_buckets:
            return [("max_distance", f"must be >= num_buckets ({self.num_buckets})")]
        return []

    def build(self, model):
        from gptkit_labkit.nn import T5RelativeBias

        return T5RelativeBias(model.n_heads, self.num_buckets, self.max_distance)


class LionSpec(plugin.OptimizerSpec):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum, so every coordinate
    moves by lr. Use a smaller lr than AdamW's (``lr_ratio`` scales the spec's ``train.lr``)."""

    kind: Literal["lion"] = "lion"
    lr_ratio: float = Field(0.3, gt=0, description="This optimizer's lr as a fraction of train.lr.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)

    def build(self, model, *, lr):
        from gptkit.components.optimizers import decay_groups
        from gptkit_labkit.lion import Lion

        # Each group's own lr, relative to the base lr; the trainer's schedule scales it.
        groups = decay_groups(model, self.weight_decay)
        for group in groups:
            group["lr"] = lr * self.lr_ratio
        return Lion(groups, lr=lr * self.lr_ratio, betas=(self.beta1, self.beta2))


@plugin.hookimpl
def gptkit_register_attention(register):
    register(TalkingHeadsSpec)


@plugin.hookimpl
def gptkit_register_positional(register):
    register(T5BiasSpec)


@plugin.hookimpl
def gptkit_register_tokenizer(register):
    register(WordTokenizerSpec)


@plugin.hookimpl
def gptkit_register_sampler(register):
    register(MirostatSpec)


@plugin.hookimpl
def gptkit_register_optimizer(register):
    register(LionSpec)
