"""Text generation with torch: a KV-cache backend for the shared decoding loop, and the
``Generator`` object (load a run, generate for one prompt or a batch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptkit.api import Inference
from gptkit.components.attention import StaticKV
from gptkit.decoding import Completion, decode_loop
from gptkit.model import GPT


class StaticCache:
    """A preallocated KV cache: per layer, keys and values (B, H_kv, capacity, hd), filled in
    place one step at a time. Slot j holds the token at index j of the left-padded batch."""

    def __init__(self, prefill: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        self.keys, self.values = [], []
        for k, v in prefill:
            B, H_kv, T, hd = k.shape
            self.keys.append(k.new_zeros(B, H_kv, max(capacity, T), hd))
            self.values.append(v.new_zeros(B, H_kv, max(capacity, T), hd))
        self.length = 0
        self.write(prefill)

    def views(self) -> list[StaticKV]:
        """The slots in use, as views (no copy)."""
        L = self.length
        position = torch.tensor(L, device=self.keys[0].device)
        return [
            StaticKV(k[:, :, :L], v[:, :, :L], position) for k, v in zip(self.keys, self.values)
        ]

    def write(self, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the new tokens' keys and values in the next slots, in place."""
        L, T = self.length, new[0][0].size(2)
        for buf_k, buf_v, (k, v) in zip(self.keys, self.values, new):
            buf_k[:, :, L : L + T] = k
            buf_v[:, :, L : L + T] = v
        self.length = L + T

    def keep_rows(self, rows: list[int]) -> StaticCache:
        index = torch.tensor(rows, device=self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        return self

    def join(self, other: StaticCache, shift: int, shift_other: int, width: int) -> StaticCache:
        """This cache's rows, then ``other``'s, each moved right by its shift (``width`` slots
        in use after)."""
        capacity = max(self.keys[0].size(2), other.keys[0].size(2), width)

        def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            buf = a.new_zeros(a.size(0) + b.size(0), a.size(1), capacity, a.size(3))
            buf[: a.size(0), :, shift:width] = a[:, :, : self.length]
            buf[a.size(0) :, :, shift_other:width] = b[:, :, : other.length]
            return buf

        joined = StaticCache.__new__(StaticCache)  # filled here, not from a prefill
        joined.keys = [stack(a, b) for a, b in zip(self.keys, other.keys)]
        joined.values = [stack(a, b) for a, b in zip(self.values, other.values)]
        joined.length = width
        return joined


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
                return out.logits[:, -1].float().cpu().numpy(), StaticCache(
                    out.past_key_values, self.max_seq_len
                )
            return out.logits[:, -1].float().cpu().numpy(), out.past_key_values
        out = self.model(
            idx, positions=pos, past_key_values=past.views(), key_mask=mask, last_only=True
        )
        past.write(out.past_key_values)
        return out.logits[:, -1].float().cpu().numpy(), past

    def keep_rows(self, past, rows: list[int]):
        """The cache of the given rows only (finished rows leave the batch)."""
        if isinstance(past, StaticCache):
            return past.keep_rows(rows)
        index = torch.tensor(rows, device=self.device)
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]

    def join_rows(self, past, new, shift: int, shift_new: int, width: int):
        """The running rows' cache, then the joiners' (see ``DecodeBatch``), right-aligned."""
        if isinstance(past, StaticCache):
            return past.join(new, shift, shift_new, width)
        pad, pad_new = (0, 0, shift, 0), (0, 0, shift_new, 0)  # F.pad: last dim first

        def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(a, pad), torch.nn.functional.pad(b, pad_new)])

        return [(cat(k, k2), cat(v, v2)) for (k, v), (k2, v2) in zip(past, new)]


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
    def from_run(
        cls,
        run: str | Path,
        checkpoint: str = "latest",
        overrides: Sequence[str] = (),
        device: str = "cpu",
    ) -> Generator:
        """Load a run directory's model, tokenizer and sampler (``overrides``: --set style)."""
        from gptkit.training.rundir import load_run

        loaded = load_run(run, checkpoint=checkpoint, overrides=overrides, device=device)
        gen = cls(loaded.model, loaded.tokenizer, loaded.spec.sampler, device)
        gen.plugins = tuple(loaded.spec.plugins)
        return gen


def sample_text(
    model: GPT, tokenizer: Any, sampler: Any, n_tokens: int, seed: int, prompt: str = "\n"
) -> str:
    """A short sample for progress reports (the model is put back in its previous mode)."""
    was_training = model.training
    try:
        try:
            prompt_ids_ok = bool(tokenizer.encode(prompt))
        except Exception:
            prompt_ids_ok = False
        out = decode_loop(
            TorchBackend(model, next(model.parameters()).device),
            tokenizer,
            [prompt if prompt_ids_ok else ""],
            sampler,
            max_new_tokens=n_tokens,
            seed=seed,
        )
        return out[0].text
    finally:
        model.train(was_training)


__all__ = ["Generator", "TorchBackend", "StaticCache", "Completion", "sample_text"]
