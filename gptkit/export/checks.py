"""The contract's causal and cache checks, run on the real model before a bundle is written.

The parity gate compares torch with onnxruntime, which run the same code: an attention that
peeks at a later token, or whose KV cache loses an entry, passes it. These checks hold the
model itself to the contract on a few positions (cheap: one short sequence)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError

CHECK_TOKENS = 24  # longer than 20, where a cache that drops entries late goes wrong
CHECK_RTOL = 1e-4  # of the logits' scale


def _component(spec: Any) -> str:
    m = spec.model
    return f"model.attention '{m.attention.kind}' (with positional '{m.positional.kind}')"


def _refuse(spec: Any, prop: str, detail: str) -> GptkitError:
    return GptkitError(
        f"{_component(spec)} fails the contract's {prop} check: {detail}; the bundle was not "
        "written",
        "Run gptkit's contract tests for the component (gptkit.plugin.contract_cases).",
    )


# How a model decodes, as (name, static, fixed-shape steps): the concatenating cache; the
# preallocated one, read as slices of the slots in use; and the step the exported graph (and a
# CUDA graph) runs, over the whole buffers with the free slots masked, which an attention
# that ignores the mask there gets wrong.
_CACHES = (
    ("KV cache", False, False),
    ("preallocated (static) KV cache", True, False),
    ("fixed-shape steps over the whole preallocated cache (as the exported graph)", True, True),
)


def _decoded(
    model: Any, idx: torch.Tensor, static: bool, whole: bool
) -> tuple[list[torch.Tensor], str | None]:
    """The logits of each position of ``idx`` (1, T), decoded one token at a time through the
    model's concatenating cache or (``static``) its preallocated one, by steps over its
    whole buffers (``whole``: run directly, not captured, on the CPU); and why those steps
    could not run, if they could not."""
    import warnings

    from gptkit.inference.torch import TorchBackend

    device = next(model.parameters()).device
    backend = TorchBackend(model, device, static=static, graphs=whole)
    if whole:
        backend.capture_after = 0  # every decode step over the whole buffers
    ids = idx.cpu().numpy()
    past, out = None, []
    with warnings.catch_warnings():  # a fixed-shape step that fails is named in the refusal
        if whole:
            warnings.filterwarnings("ignore", message="decoding without CUDA graphs")
        for t in range(ids.shape[1]):
            mask = np.ones((1, t + 1), dtype=bool)
            logits, past = backend(ids[:, t : t + 1], np.array([[t]]), mask, past)
            out.append(torch.as_tensor(np.asarray(logits, dtype=np.float32)))
    return out, (backend.graphs_off if whole and not backend.graphs else None)


@torch.no_grad()
def model_checks(model: Any, spec: Any, vocab_size: int) -> dict[str, Any]:
    """Check ``model`` is causal and that cached decoding equals the full forward pass.
    Raises a :class:`GptkitError` naming the component and the property; returns a report."""
    was_training = model.training
    model.eval()
    try:
        T = min(CHECK_TOKENS, spec.model.max_seq_len)
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, vocab_size, (1, T), generator=gen)
        positions = torch.arange(T)[None]
        full = model(idx, positions=positions).logits.float()
        tol = CHECK_RTOL * max(1.0, float(full.abs().max()))
        report: dict[str, Any] = {"tokens": T, "tolerance": tol}
        for k in sorted({T // 2, T - 1} - {0}):  # one position has no earlier one to change
            changed = idx.clone()
            changed[0, k] = (changed[0, k] + 1) % vocab_size
            other = model(changed, positions=positions).logits.float()
            diff = float((other[:, :k] - full[:, :k]).abs().max())
            if diff > tol:
                raise _refuse(
                    spec,
                    "causal",
                    f"changing the token at position {k} changed the logits of earlier "
                    f"positions by {diff:.2e} (tolerance {tol:.1e})",
                )
        report["causal"] = T > 1
        if T < 2:  # one position: nothing is decoded from a cache
            return report
        # Both caches: the exported graph decodes over the preallocated one where the
        # components support it, and parity compares it with torch's, which shares its code.
        for cache, static, whole in _CACHES if model.static_cache else _CACHES[:1]:
            decoded, failed = _decoded(model, idx, static, whole)
            if failed:
                raise _refuse(spec, "cache-equals-full-forward", f"the {cache} failed: {failed}")
            for t, logits in enumerate(decoded):
                diff = float((logits - full[:, t]).abs().max())
                if diff > tol:
                    raise _refuse(
                        spec,
                        "cache-equals-full-forward",
                        f"decoding token by token with the {cache} gives logits differing "
                        f"from the full forward pass by {diff:.2e} at position {t} "
                        f"(tolerance {tol:.1e})",
                    )
        report["cache_equals_full"] = True
        return report
    finally:
        model.train(was_training)
