"""Optimizers: adamw (with decay / no-decay parameter groups, as nanoGPT does) and muon."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from pydantic import Field

from gptkit.components.base import OptimizerSpec
from gptkit.registry.hookspecs import hookimpl


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
    fused: bool | None = Field(
        None,
        description="One fused kernel for the whole update (torch's fused AdamW). Default: on "
        "CUDA. A fused optimizer skips a non-finite step on the device, so the trainer reads "
        "the loss only at log steps. Sharded (FSDP) parameters keep the default implementation.",
    )

    def build(self, model, *, lr: float):
        import torch

        params = list(model.parameters())
        fused = self.fused
        if fused is None:  # the default: on CUDA
            fused = bool(params) and all(p.is_cuda for p in params)
        if any(hasattr(p, "device_mesh") for p in params):
            fused = False  # sharded (FSDP) parameters: the default implementation
        return torch.optim.AdamW(
            decay_groups(model, self.weight_decay),
            lr=lr,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            **({"fused": True} if fused else {}),
        )


@hookimpl
def gptkit_register_optimizer(register):
    register(AdamWSpec)
    register(MuonSpec)


# --------------------------------------------------------------------------- muon


def zeropower_via_newtonschulz5(g, steps: int = 5):
    """The nearest semi-orthogonal matrix to ``g`` (its ``U V^T``), approximately: a quintic
    Newton-Schulz iteration whose coefficients (Jordan, 2024) push every singular value into
    roughly [0.7, 1.2] in five steps. Runs in float32, so results are the same on every CPU."""

    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X X^T is the smaller product
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.mT if tall else x


def muon_groups(model, lr: float, spec: MuonSpec) -> list[dict]:
    """Parameter groups with their own learning rates (multiples of ``lr``): Muon for the 2-D
    matrices inside the transformer blocks; AdamW for the embeddings, the output head (when not
    tied), and every norm gain, bias or other non-matrix parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = [(n, p) for n, p in named if n.startswith("blocks.")]
    matrices = [p for n, p in in_blocks if p.dim() == 2]
    embeds = [p for n, p in named if n.startswith(("tok_emb.", "positional.")) and p.dim() >= 2]
    head = [p for n, p in named if n.startswith("lm_head.")]
    taken = {id(p) for p in matrices + embeds + head}
    rest = [p for _, p in named if id(p) not in taken]
    adam = {"use_muon": False, "betas": (spec.adam_beta1, spec.adam_beta2), "eps": spec.adam_eps}
    groups = [
        {
            "name": "muon",
            "params": matrices,
            "lr": lr * spec.muon_lr_scale,
            "use_muon": True,
            "momentum": spec.momentum,
            "nesterov": spec.nesterov,
            "ns_steps": spec.ns_steps,
            "weight_decay": spec.weight_decay,
        },
        {
            "name": "embed",
            "params": embeds,
            "lr": lr * spec.embed_lr_scale,
            "weight_decay": spec.adam_weight_decay,
            **adam,
        },
        {
            "name": "head",
            "params": head,
            "lr": lr * spec.head_lr_scale,
            "weight_decay": spec.adam_weight_decay,
            **adam,
        },
        {
            "name": "scalar",
            "params": rest,
            "lr": lr * spec.scalar_lr_scale,
            "weight_decay": 0.0,
            **adam,
        },
    ]
    return [g for g in groups if g["params"]]


@functools.cache
def _muon_optimizer_class():
    import torch

    class Muon(torch.optim.Optimizer):
        """Muon for groups marked ``use_muon``, AdamW for the others, in one optimizer (so one
        state dict, loadable with ``torch.load(weights_only=True)``: tensors and numbers only)."""

        def __init__(self, groups: list[dict], lr: float) -> None:
            super().__init__(groups, {"lr": lr, "weight_decay": 0.0})

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                (_muon_update if group["use_muon"] else _adamw_update)(self.state, group)
            return loss

    return Muon


def _muon_update(optimizer_state: Any, group: dict) -> None:
    """Muon's step for one group: Nesterov momentum, then one orthogonalised update per
    matrix. Matrices of the same shape go through Newton-Schulz together (one batched matmul
    per iteration, not one per matrix): at small widths the per-call overhead is most of the
    cost."""
    import torch

    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    for p in params:
        if "momentum_buffer" not in optimizer_state[p]:
            optimizer_state[p]["momentum_buffer"] = torch.zeros_like(p)
    bufs = [optimizer_state[p]["momentum_buffer"] for p in params]
    torch._foreach_lerp_(bufs, grads, 1 - mu)
    updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    for shape, idx in by_shape.items():
        ortho = zeropower_via_newtonschulz5(
            torch.stack([updates[i] for i in idx]), group["ns_steps"]
        )
        # An orthogonal update has RMS 1/sqrt(max side); this keeps tall matrices'
        # per-entry step the same as square ones' (Jordan, 2024).
        scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
        torch._foreach_add_(
            [params[i] for i in idx],
            list(ortho.to(params[idx[0]].dtype).unbind(0)),
            alpha=-lr * scale,
        )


def _adamw_update(optimizer_state: Any, group: dict) -> None:
    """AdamW over the group's tensors at once (foreach ops: many small tensors)."""
    import torch

    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    for p in params:
        state = optimizer_state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
    states = [optimizer_state[p] for p in params]
    torch._foreach_add_([s["step"] for s in states], 1.0)
    avgs = [s["exp_avg"] for s in states]
    sqs = [s["exp_avg_sq"] for s in states]
    steps = [float(s["step"]) for s in states]
    torch._foreach_lerp_(avgs, grads, 1 - beta1)
    torch._foreach_mul_(sqs, beta2)
    torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - beta1**t) for t in steps])


class MuonSpec(OptimizerSpec):
    """Muon (Jordan et al., 2024: momentum, then Newton-Schulz orthogonalisation of each
    update) on the 2-D weight matrices inside the blocks; AdamW on the embeddings, the output
    head, norms and biases. Every group's learning rate is a multiple of ``train.lr`` that the
    schedule scales. Not for ``train.parallel=fsdp`` (it needs whole matrices)."""

    kind: Literal["muon"] = "muon"
    muon_lr_scale: float = Field(
        10.0, gt=0, description="Muon's learning rate as a multiple of train.lr."
    )
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(5, ge=1, le=20, description="Newton-Schulz iterations per update.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled decay of the Muon matrices.")
    embed_lr_scale: float = Field(1.0, gt=0, description="Embeddings' lr / train.lr (AdamW).")
    head_lr_scale: float = Field(1.0, gt=0, description="Untied output head's lr / train.lr.")
    scalar_lr_scale: float = Field(1.0, gt=0, description="Norms' and biases' lr / train.lr.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    adam_weight_decay: float = Field(0.0, ge=0, description="AdamW decay of embeddings/head.")

    def build(self, model, *, lr: float):
        return _muon_optimizer_class()(muon_groups(model, lr, self), lr)
