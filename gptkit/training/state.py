"""``TrainState``: everything a resume needs besides the weights, carried through the loop.

It is saved whole in each checkpoint (``state.pt``, tensors and plain containers only, so it
loads with ``torch.load(weights_only=True)``) and read back whole on resume: step counters,
the losses seen so far, and every random stream (dropout per rank, batch positions, CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gptkit.errors import RunError
from gptkit.safeio import finite_number


@dataclass
class TrainState:
    """The loop's counters and random streams (the optimizer state travels beside it)."""

    step: int = 0
    best_val: float | None = None
    last_val: float | None = None
    skipped: int = 0
    bad_in_a_row: int = 0
    evals_since_best: int = 0  # evaluations in a row without improvement (train.early_stop)
    tokens_seen: int = 0
    train_seconds: float = 0.0  # wall time spent training, summed over resumes
    data_rng: torch.Tensor | None = None
    torch_rng_per_rank: list[torch.Tensor] = field(default_factory=list)
    cuda_rng: list[torch.Tensor] = field(default_factory=list)

    def to_checkpoint(self, optimizer_state: Any, optimizer_format: str) -> dict[str, Any]:
        """The dict written as ``state.pt``."""
        return {
            "step": self.step,
            "best_val_loss": self.best_val,
            "val_loss": self.last_val,
            "skipped_steps": self.skipped,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "evals_since_best": self.evals_since_best,
            "data_rng": self.data_rng,
            "torch_rng_per_rank": self.torch_rng_per_rank,
            "torch_rng": self.torch_rng_per_rank[0] if self.torch_rng_per_rank else None,
            "cuda_rng": self.cuda_rng,
            "optimizer": optimizer_state,
            "optimizer_format": optimizer_format,
        }

    @classmethod
    def from_checkpoint(cls, state: Any, where: str) -> TrainState:
        """Read a ``state.pt`` dict back, checking every field's type (a damaged file is a
        clear error naming the field, never a traceback later in the loop)."""
        if not isinstance(state, dict):
            raise RunError(f"{where}: training state is a {type(state).__name__}, not a dict")
        step = _get(state, "step", int, where, required=True)
        if step < 0:
            raise RunError(f"{where}: training state field 'step' is negative ({step})")
        rngs = state.get("torch_rng_per_rank") or [state.get("torch_rng")]
        rngs = [r for r in rngs if r is not None]
        for r in rngs:
            _check_rng(r, "torch_rng_per_rank", where)
        data_rng = state.get("data_rng")
        if data_rng is not None:
            _check_rng(data_rng, "data_rng", where)
        return cls(
            step=step,
            best_val=_get(state, "best_val_loss", float, where),
            last_val=_get(state, "val_loss", float, where),
            skipped=_get(state, "skipped_steps", int, where) or 0,
            tokens_seen=_get(state, "tokens_seen", int, where) or 0,
            train_seconds=_get(state, "train_seconds", float, where) or 0.0,
            evals_since_best=_get(state, "evals_since_best", int, where) or 0,
            data_rng=data_rng,
            torch_rng_per_rank=rngs,
            cuda_rng=list(state.get("cuda_rng") or []),
        )

    def restore_rngs(self, rank: int, data_gen: torch.Generator, device: torch.device) -> None:
        """Put this process's random streams back where the checkpoint left them."""
        if self.torch_rng_per_rank:
            torch.set_rng_state(
                self.torch_rng_per_rank[min(rank, len(self.torch_rng_per_rank) - 1)]
            )
        if self.data_rng is not None:
            data_gen.set_state(self.data_rng)
        if device.type == "cuda" and self.cuda_rng:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _get(state: dict[str, Any], key: str, kind: type, where: str, required: bool = False) -> Any:
    value = state.get(key)
    if value is None:
        if required:
            raise RunError(f"{where}: training state has no '{key}'")
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, int):
        ok = finite_number(value) is not None  # not an integer too large for a float
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RunError(
            f"{where}: training state field '{key}' should be a number, got {type(value).__name__}"
        )
    return kind(value)


def _check_rng(value: Any, key: str, where: str) -> None:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        raise RunError(f"{where}: training state field '{key}' is not a random-generator state")
