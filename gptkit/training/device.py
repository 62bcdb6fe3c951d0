"""Where training runs: picking the device a spec names, bf16 autocast where it is supported,
and the settings that make a CUDA device fast by default (TF32 matmuls).

Shared by the trainer and ``gptkit bench`` (which measures on the spec's device, so its MFU is
against what that device does, not the CPU's).
"""

from __future__ import annotations

import time

import torch

from gptkit.errors import GptkitError


def pick_device(name: str) -> torch.device:
    """The device for ``train.device`` (``auto``: CUDA, then MPS, then the CPU)."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        # This process's GPU (under torchrun, cuda:LOCAL_RANK: see Dist), index spelled out.
        return torch.device("cuda", torch.cuda.current_device())
    if name == "auto":
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GptkitError(
            "train.device is 'cuda' but no CUDA device is available",
            "Use train.device=auto or cpu.",
        )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise GptkitError("train.device is 'mps' but MPS is not available", "Use auto or cpu.")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``auto`` where the device supports it, ``bf16`` or an
    error, ``fp32`` never."""
    if precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise GptkitError(
            f"train.precision is bf16 but {device.type} has no bf16 autocast here",
            "Use train.precision=auto or fp32.",
        )
    return supported


def tune(device: torch.device) -> None:
    """Per-device defaults: on CUDA, fp32 matmuls and convolutions may use TF32 (what is left
    in fp32 under bf16 autocast: the loss, the optimizer's maths)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200)``: what a report names as its device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA measure nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10
) -> float:
    """Best matrix-multiply rate of ``device`` in ``dtype``, FLOP/s (2 n^3 per n x n product):
    the peak MFU is measured against, measured now on the device the spec trains on."""
    if device.type == "cuda":
        n = max(n, 8192)  # a GPU needs large products to reach its peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
