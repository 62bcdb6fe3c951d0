"""The torch backend of the decoding loop: a GPT in this process, with the static cache when
every component supports it; and ``open_run``, the parts of an ``Inference`` over a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.components.attention import StaticKV
from gptkit.inference.cache import StaticCache, drop_slots, join_rows, keep_rows
from gptkit.model import GPT


class TorchBackend:
    """Runs a GPT for the decoding loop. The cache is a ``StaticCache`` (preallocated, updated
    in place) when every component supports it, else the model's concatenated (keys, values)."""

    def __init__(
        self, model: GPT, device: str | torch.device = "cpu", static: bool | None = None
    ) -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_seq_len = model.spec.max_seq_len
        self.static = model.static_cache if static is None else static and model.static_cache

    @torch.inference_mode()
    def __call__(self, ids, positions, key_mask, past):
        idx = torch.from_numpy(ids).to(self.device)
        pos = torch.from_numpy(positions).to(self.device)
        # No mask at all when nothing is padded: the fused attention fast path applies.
        mask = None if key_mask.all() else torch.from_numpy(key_mask).to(self.device)
        if past is None or not self.static:
            out = self.model(
                idx, positions=pos, past_key_values=past, key_mask=mask, last_only=True
            )
            if self.static:  # the prefill fills a fresh preallocated cache
                return out.logits[:, -1].float().cpu().numpy(), StaticCache.from_prefill(
                    _flat(out.past_key_values), self.max_seq_len
                )
            return out.logits[:, -1].float().cpu().numpy(), out.past_key_values
        out = self.model(
            idx, positions=pos, past_key_values=_views(past), key_mask=mask, last_only=True
        )
        past.write(_flat(out.past_key_values))
        return out.logits[:, -1].float().cpu().numpy(), past

    @torch.inference_mode()
    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """The logits (T, V) at every position of one prompt (no cache kept)."""
        idx = torch.tensor([ids], device=self.device)
        return self.model(idx).logits[0].float().cpu().numpy()

    keep_rows = staticmethod(keep_rows)
    join_rows = staticmethod(join_rows)
    drop_slots = staticmethod(drop_slots)


def _flat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-layer (keys, values) as the cache's flat list: layer 0 keys, layer 0 values, ..."""
    return [x for pair in pairs for x in pair]


def _views(cache: StaticCache) -> list[StaticKV]:
    """Each layer's slots in use, as views of the cache's buffers (no copy)."""
    L, buffers = cache.length, cache.buffers
    position = torch.tensor(L, device=buffers[0].device)
    shared: dict = {}  # one score mask for every layer of this step (see StaticKV.shared)
    return [
        StaticKV(k[:, :, :L], v[:, :, :L], position, shared)
        for k, v in zip(buffers[0::2], buffers[1::2])
    ]


def open_run(
    run: str | Path,
    checkpoint: str = "latest",
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """The parts of an ``Inference`` over a run directory's model, tokenizer and sampler
    (``overrides``: --set style): see ``gptkit.load``."""
    from gptkit.registry.registry import load_registry
    from gptkit.store.rundir import load_run

    loaded = load_run(run, checkpoint=checkpoint, overrides=overrides, device=device)
    plugins = tuple(loaded.spec.plugins)
    return {
        "backend": TorchBackend(loaded.model, device),
        "tokenizer": loaded.tokenizer,
        "sampler": loaded.spec.sampler,
        "registry": lambda kind: load_registry(plugins),
        "path": Path(run),
        "plugins": plugins,
    }


__all__ = ["TorchBackend", "open_run"]
