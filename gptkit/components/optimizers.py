"""Optimizers: adamw (with decay / no-decay parameter groups, as nanoGPT does)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptkit.components.base import OptimizerSpec
from gptkit.hookspecs import hookimpl


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Weight-decay the matrices (linear and embedding weights), not biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamWSpec(OptimizerSpec):
    """AdamW (Loshchilov & Hutter, 2019)."""

    kind: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)

    def build(self, model, *, lr: float):
        import torch

        return torch.optim.AdamW(
            decay_groups(model, self.weight_decay),
            lr=lr,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
        )


@hookimpl
def gptkit_register_optimizer(register):
    register(AdamWSpec)
