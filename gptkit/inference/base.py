"""``Inference``: gptkit's one generation object, whatever runs the model (a run on torch, a
bundle on onnxruntime). Options have one meaning everywhere (``GenerationOptions``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.inference.decoding import (
    Completion,
    GenerationOptions,
    Processing,
    decode_loop,
    resolve_sampler,
    start_batch,
)
from gptkit.memory import check_fits


class Inference:
    """Generation, whatever runs the model: a training run (torch) or an export bundle
    (onnxruntime). Options have one meaning everywhere (see ``GenerationOptions``):
    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` / ``min_p`` pick that sampler; other
    sampler fields go by name (``kind="typical", p=0.9``).

    >>> gen = gptkit.load("runs/shakespeare-char")                  # doctest: +SKIP
    >>> gen.generate("ROMEO:", max_new_tokens=100, temperature=0)    # doctest: +SKIP
    >>> for piece in gen.stream("ROMEO:", seed=1): print(piece, end="")  # doctest: +SKIP
    """

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        sampler: Any,
        *,
        registry: Callable[[str], Any] | None = None,
        path: Path | None = None,
        manifest: dict[str, Any] | None = None,
        plugins: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.sampler = sampler  # the run's or bundle's default sampler spec
        self.max_seq_len = backend.max_seq_len
        self.model = getattr(backend, "model", None)  # a GPT (torch) or an OnnxModel (onnxruntime)
        self.path = path  # the run or bundle folder it was opened from, if any
        self.manifest = manifest  # a bundle's verified gptkit.json, else None
        self.plugins = plugins  # the run's or bundle's ``plugins:`` modules
        self._registry = registry

    # ----------------------------------------------------------------- opening

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        checkpoint: str = "latest",
        device: str = "cpu",
        threads: int | None = None,
        spin: bool = True,
    ) -> Inference:
        """Open a run directory (torch, imported now) or an export bundle (onnxruntime): the
        backend is picked from what the folder holds. ``gptkit.load`` is this function;
        ``checkpoint`` and ``device`` are for runs, ``threads`` and ``spin`` (onnxruntime's
        threads spin-wait between ops) for bundles."""
        from gptkit.store.bundle import check_model_path, is_bundle

        path = Path(path)
        check_model_path(path)
        if is_bundle(path):  # a bundle, even a damaged one, says why
            from gptkit.inference.onnx import open_bundle

            return cls(**open_bundle(path, threads=threads, spin=spin))
        if importlib.util.find_spec("torch") is None:
            raise GptkitError(
                f"{path} is not an export bundle, and opening a training run needs "
                "PyTorch, which is not installed",
                "Install the training extra: pip install 'gptkit[train]'.",
            )
        from gptkit.inference.torch import open_run

        return cls(**open_run(path, checkpoint=checkpoint, device=device))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **kwargs: Any) -> Inference:
        """The seed project's name for :meth:`load` (a thin alias)."""
        return cls.load(checkpoint_dir, **kwargs)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, sampler: Any = None, device: str = "cpu"
    ) -> Inference:
        """Generation from a GPT in this process (torch), e.g. one just trained; ``sampler``
        defaults to the spec's default (top_p)."""
        from gptkit.inference.torch import TorchBackend

        if sampler is None:
            from gptkit.registry.registry import load_registry

            sampler = load_registry().get("sampler", "top_p").model_validate({"kind": "top_p"})
        return cls(TorchBackend(model, device), tokenizer, sampler)

    # ----------------------------------------------------------------- options

    def registry(self, kind: str) -> Any:
        """A registry that knows sampler ``kind`` (a bundle's stays torch-free)."""
        if self._registry is not None:
            return self._registry(kind)
        from gptkit.registry.registry import load_registry

        return load_registry(self.plugins)

    def sampler_for(self, options: GenerationOptions) -> Any:
        """The sampler these options ask for: the default sampler with the options applied."""
        kind = options.sampler_changes(self.sampler).get("kind", self.sampler.kind)
        return resolve_sampler(self.registry(kind), self.sampler, options)

    def sampler_with(self, **options: Any) -> Any:
        """The default sampler with options such as ``temperature=0.7``, ``top_k=40`` or any
        sampler field (``kind="min_p", p=0.05``)."""
        return self.sampler_for(GenerationOptions.from_kwargs(**options))

    # ----------------------------------------------------------------- generating

    def complete(
        self,
        prompts: Sequence[str] | str,
        options: GenerationOptions | None = None,
        *,
        sampler: Any = None,
        use_cache: bool = True,
        on_text: Callable[[int, str], None] | None = None,
        **kwargs: Any,
    ) -> list[Completion]:
        """Continuations (text, tokens, finish reason) for a batch of prompts (a string is one
        prompt: ``complete("ROMEO:")`` gives one completion).

        ``options`` and keywords are ``GenerationOptions`` fields (keywords win); ``sampler``
        is a dict of sampler fields, or a sampler spec that replaces the default sampler;
        ``on_text(row, piece)`` streams.
        """
        if isinstance(sampler, dict):  # sampler fields, as GenerationOptions.sampler
            kwargs["sampler"], sampler = sampler, None
        options = GenerationOptions.from_kwargs(options, **kwargs)
        chosen = sampler if sampler is not None else self.sampler_for(options)
        if sampler is not None and options.sampler_changes(sampler):
            chosen = resolve_sampler(self.registry(sampler.kind), sampler, options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_rows_fit(len(prompts))
        return decode_loop(
            self.backend,
            self.tokenizer,
            prompts,
            chosen,
            max_new_tokens=options.max_new_tokens,
            seed=options.seed,
            use_cache=use_cache,
            on_text=on_text,
            processing=Processing.from_options(options),
        )

    def check_rows_fit(self, rows: int) -> None:
        """Refuse (a clear error) ``rows`` continuations at once whose KV cache at the full
        context would not fit in this machine's memory."""
        check_fits(
            # Twice: a cache that grows is copied into its larger buffers.
            2 * rows * self.max_seq_len * self.cache_bytes_per_token(),
            f"{rows:,} continuations at once (their cache at the full context of "
            f"{self.max_seq_len:,} tokens, and its copy as it grows)",
            "Ask for fewer at once (--num-samples), or make them in several calls.",
        )

    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one row takes: a bundle's exact figure; for a run,
        the keys and values of every layer at the model's width (a bound: grouped heads take
        less)."""
        m = self.manifest
        if m is not None:
            layers, heads, width = (m.get(k) for k in ("n_layers", "n_kv_heads", "head_dim"))
            if isinstance(layers, int) and isinstance(heads, int) and isinstance(width, int):
                return 2 * layers * heads * width * 4
            return 0  # a bundle older than these fields: no check
        spec = getattr(self.model, "spec", None)
        if spec is None:
            return 0
        return int(2 * spec.n_layers * spec.d_model * 4)

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Text for one prompt, or a list of texts for a list of prompts."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = self.complete(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            **options,
        )
        texts = [c.text for c in out]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(
        self, prompt: str, options: GenerationOptions | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Text for one prompt, piece by piece as it is decoded (stop strings are never
        shown half-way)."""
        options = GenerationOptions.from_kwargs(options, **kwargs)
        pieces: list[str] = []
        batch, _ = start_batch(
            self.backend,
            self.tokenizer,
            [prompt],
            self.sampler_for(options),
            max_new_tokens=options.max_new_tokens,
            seed=options.seed,
            on_text=lambda row, piece: pieces.append(piece),
            processing=Processing.from_options(options),
        )
        while len(batch):
            batch.step()
            yield from pieces
            pieces.clear()
