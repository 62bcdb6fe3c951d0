"""Text generation with torch: a KV-cache backend for the shared decoding loop, and the
``Generator`` object (load a run, generate for one prompt or a batch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptkit.api import Inference
from gptkit.decoding import Completion, decode_loop
from gptkit.model import GPT


class TorchBackend:
    """Runs a GPT for the decoding loop; the cache is the model's own (keys, values) list."""

    def __init__(self, model: GPT, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_seq_len = model.spec.max_seq_len

    @torch.inference_mode()
    def __call__(self, ids, positions, key_mask, past):
        idx = torch.from_numpy(ids).to(self.device)
        pos = torch.from_numpy(positions).to(self.device)
        # No mask at all when nothing is padded: the fused attention fast path applies.
        mask = None if key_mask.all() else torch.from_numpy(key_mask).to(self.device)
        out = self.model(idx, positions=pos, past_key_values=past, key_mask=mask, last_only=True)
        return out.logits[:, -1].float().cpu().numpy(), out.past_key_values


class Generator(Inference):
    """Generation from a model in this process (torch): an ``Inference`` over a GPT.

    >>> gen = Generator.from_run("runs/shakespeare-char/latest")    # doctest: +SKIP
    >>> gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9)  # doctest: +SKIP
    """

    def __init__(self, model: GPT, tokenizer: Any, sampler: Any, device: str = "cpu") -> None:
        super().__init__(TorchBackend(model, device), tokenizer, sampler)
        self.model = model
        self.plugins: tuple[str, ...] = ()  # the run's ``plugins:`` modules

    def registry(self, kind: str) -> Any:
        from gptkit.registry import load_registry

        return load_registry(self.plugins)

    @classmethod
    def from_run(cls, run: str | Path, checkpoint: str = "latest", overrides: Sequence[str] = (),
                 device: str = "cpu") -> Generator:
        """Load a run directory's model, tokenizer and sampler (``overrides``: --set style)."""
        from gptkit.training.rundir import load_run

        loaded = load_run(run, checkpoint=checkpoint, overrides=overrides, device=device)
        gen = cls(loaded.model, loaded.tokenizer, loaded.spec.sampler, device)
        gen.plugins = tuple(loaded.spec.plugins)
        return gen


def sample_text(model: GPT, tokenizer: Any, sampler: Any, n_tokens: int, seed: int,
                prompt: str = "\n") -> str:
    """A short sample for progress reports (the model is put back in its previous mode)."""
    was_training = model.training
    try:
        try:
            prompt_ids_ok = bool(tokenizer.encode(prompt))
        except Exception:
            prompt_ids_ok = False
        out = decode_loop(TorchBackend(model, next(model.parameters()).device), tokenizer,
                          [prompt if prompt_ids_ok else ""], sampler,
                          max_new_tokens=n_tokens, seed=seed)
        return out[0].text
    finally:
        model.train(was_training)


__all__ = ["Generator", "TorchBackend", "Completion", "sample_text"]
