"""The Lion optimizer (Chen et al., 2023), imported by ``LionSpec.build`` only."""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """update = sign(beta1 * m + (1 - beta1) * g); p -= lr * (update + weight_decay * p);
    m = beta2 * m + (1 - beta2) * g. Reads each group's ``lr`` at every step, so the
    trainer's schedule applies; the state is one tensor per parameter (weights_only-safe)."""

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
