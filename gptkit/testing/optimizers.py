"""The properties every optimizer must have: it descends, it follows the scheduled learning
rate (zero means no step), and its state loads with weights_only and resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptkit.model import GPT
from gptkit.spec.validate import validate_spec
from gptkit.testing.models import CONTRACT_MODEL, _tokens


def run_optimizer_case(case: Any, example: Any, registry: Any, folder: Path) -> None:
    {
        "descends": optimizer_descends,
        "zero_lr": optimizer_zero_lr,
        "follows_lr": optimizer_follows_lr,
        "state_weights_only": optimizer_state_weights_only,
    }[case.prop](example)


LR = 1e-3


def _optimizer_model(seed: int = 0) -> GPT:
    spec = validate_spec({"name": "contract", "model": {**CONTRACT_MODEL, "max_seq_len": 16}})
    torch.manual_seed(seed)
    return GPT(spec.model).train()


def _built(spec: Any, model: GPT) -> Any:
    """Build as the trainer does: base lr, then remember each group's own lr."""
    opt = spec.build(model, lr=LR)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def _schedule(opt: Any, factor: float) -> None:
    """What the trainer does every step: lr = initial_lr * lr_at(step) / train.lr."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _step(model: GPT, opt: Any, seed: int = 1) -> float:
    idx = _tokens(4, 16, seed)
    opt.zero_grad(set_to_none=True)
    loss = model(idx, idx.roll(-1, dims=1)).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def _flat(model: GPT) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def optimizer_descends(spec: Any, steps: int = 30) -> None:
    """Steps on one batch lower its loss."""
    model = _optimizer_model()
    opt = _built(spec, model)
    first = _step(model, opt)
    for _ in range(steps - 1):
        last = _step(model, opt)
    assert last < first, f"loss did not go down in {steps} steps: {first:.4f} -> {last:.4f}"


def optimizer_zero_lr(spec: Any) -> None:
    """With every group's lr scheduled to 0, steps leave the parameters as they are (an
    optimizer that keeps its own copy of the lr, ignoring the schedule, fails here)."""
    model = _optimizer_model()
    opt = _built(spec, model)
    _step(model, opt)  # build up any momentum first
    _schedule(opt, 0.0)
    before = _flat(model)
    _step(model, opt, seed=2)
    _step(model, opt, seed=3)
    moved = float((_flat(model) - before).abs().max())
    assert moved == 0.0, (
        f"parameters moved by {moved:.3g} with every group's lr at 0: the "
        "optimizer ignores the schedule (read group['lr'] in step())"
    )


def optimizer_follows_lr(spec: Any) -> None:
    """The size of a step follows the scheduled lr: half the lr, about half the step."""
    sizes = []
    for factor in (1.0, 0.5):
        model = _optimizer_model()
        opt = _built(spec, model)
        _schedule(opt, factor)
        before = _flat(model)
        _step(model, opt)
        sizes.append(float((_flat(model) - before).norm()))
    assert sizes[0] > 0, "a step with the full lr did not move the parameters"
    ratio = sizes[1] / sizes[0]
    assert 0.35 <= ratio <= 0.65, (
        f"halving every group's lr changed the step by x{ratio:.2f}, "
        "not about x0.5: the optimizer does not follow the schedule"
    )


def optimizer_state_weights_only(spec: Any) -> None:
    """The state dict holds only tensors and plain values (checkpoints load it with
    ``weights_only=True``), and a resumed optimizer steps exactly like the original."""
    import io

    model = _optimizer_model()
    opt = _built(spec, model)
    for seed in (1, 2, 3):
        _step(model, opt, seed)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    try:
        saved = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(
            f"optimizer state does not load with weights_only=True: {exc}"
        ) from None
    twin = _optimizer_model(seed=5)
    twin.load_state_dict(saved["model"])
    twin_opt = _built(spec, twin)
    twin_opt.load_state_dict(saved["optimizer"])
    _step(model, opt, seed=4)
    _step(twin, twin_opt, seed=4)
    assert torch.equal(_flat(model), _flat(twin)), "a resumed optimizer stepped differently"
