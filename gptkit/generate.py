"""Text generation with torch: a KV-cache backend for the shared decoding loop, and the
``Generator`` object (load a run, generate for one prompt or a batch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gptkit.decoding import Completion, decode_loop, derive_sampler, sampler_changes
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


class Generator:
    """Generate text from a trained model.

    >>> gen = Generator.from_run("runs/shakespeare-char/latest")    # doctest: +SKIP
    >>> gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9)  # doctest: +SKIP
    """

    def __init__(self, model: GPT, tokenizer: Any, sampler: Any, device: str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.backend = TorchBackend(model, device)

    @classmethod
    def from_run(cls, run: str | Path, checkpoint: str = "latest", overrides: Sequence[str] = (),
                 device: str = "cpu") -> Generator:
        """Load a run directory's model, tokenizer and sampler (``overrides``: --set style)."""
        from gptkit.training.rundir import load_run

        loaded = load_run(run, checkpoint=checkpoint, overrides=overrides, device=device)
        return cls(loaded.model, loaded.tokenizer, loaded.spec.sampler, device)

    def sampler_with(self, **options: Any) -> Any:
        """The run's sampler, with options such as ``temperature=0.7`` or ``top_k=40``
        (``top_k``/``top_p``/``min_p`` switch to that sampler; ``temperature=0`` is greedy)."""
        from gptkit.registry import load_registry

        return derive_sampler(load_registry(), self.sampler, sampler_changes(**options))

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        on_text: Callable[[int, str], None] | None = None,
        **sampler_options: Any,
    ) -> list[Completion]:
        """Continuations (text, tokens, finish reason) for a batch of prompts."""
        sampler = self.sampler_with(**sampler_options) if sampler_options else self.sampler
        return decode_loop(self.backend, self.tokenizer, list(prompts), sampler,
                           max_new_tokens=max_new_tokens, seed=seed, use_cache=use_cache,
                           on_text=on_text)

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 200,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """The seed project's inference call: text for one prompt, or a list for a batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = self.complete(prompts, max_new_tokens=max_new_tokens, seed=seed,
                            temperature=temperature, top_k=top_k, top_p=top_p, **options)
        texts = [c.text for c in out]
        return texts[0] if isinstance(prompt, str) else texts


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
