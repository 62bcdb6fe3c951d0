"""Training batches: random windows of the token array and their next-token targets."""

from __future__ import annotations

import numpy as np
import torch


def get_batch(
    data: np.ndarray,
    batch_size: int,
    block: int,
    gen: torch.Generator,
    device: torch.device,
    part: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block`` tokens and their next-token targets.

    With ``part=(rank, world)`` every rank draws the same global batch and keeps its slice,
    so N processes see exactly the batch one process would.
    """
    starts = torch.randint(len(data) - block, (batch_size,), generator=gen).numpy()
    rank, world = part
    share = batch_size // world
    starts = starts[rank * share : (rank + 1) * share]
    windows = np.asarray(data[starts[:, None] + np.arange(block + 1)], dtype=np.int64)
    xy = torch.from_numpy(windows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x.to(device), y.to(device)
