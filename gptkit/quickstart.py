"""The seed project's Python API, on gptkit's own machinery: prepare data from a text file,
make loaders, create a model from a config dict or preset, train for some epochs into a
checkpoint folder, generate with an inference object.

>>> from gptkit.quickstart import prepare_data, make_loaders, create_model, Trainer, Inference
>>> data = prepare_data("input.txt")                                    # doctest: +SKIP
>>> train_loader, val_loader = make_loaders(data, batch_size=32, seq_len=64)  # doctest: +SKIP
>>> vocab = data.tokenizer.vocab_size                                   # doctest: +SKIP
>>> model = create_model("tiny", vocab_size=vocab, max_seq_len=64)      # doctest: +SKIP
>>> trainer = Trainer(model, train_loader, val_loader, checkpoint_dir="ckpt")  # doctest: +SKIP
>>> trainer.train(epochs=1)                                             # doctest: +SKIP
>>> Inference.load("ckpt").generate("ROMEO:", temperature=0.8, top_k=40)  # doctest: +SKIP

``Inference`` is gptkit's one generation object: ``gptkit.load(path)`` returns one for a run
(torch) or an export bundle (onnxruntime, no torch), with the same options everywhere. This
module imports torch only when a torch part is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptkit.errors import GptkitError
from gptkit.inference.base import Inference

if TYPE_CHECKING:  # torch stays out of a bundle-only process
    import torch

    from gptkit.model import GPT
    from gptkit.training.loop import TrainResult


@dataclass
class TextData:
    """Tokenized train and validation parts of a text, and the fitted tokenizer."""

    source: str | list[str]
    tokenizer: Any
    train: np.ndarray
    val: np.ndarray
    tokenizer_spec: dict[str, Any]
    val_fraction: float


def prepare_data(
    source: str | Path | list[str],
    tokenizer: str | dict[str, Any] = "char",
    val_fraction: float = 0.1,
) -> TextData:
    """Tokenize a text file (or glob / list / 'tinyshakespeare'); the tokenizer is fitted on
    the training part. Cached like ``gptkit train``'s data."""
    from gptkit.data.prepare import prepare_tokens
    from gptkit.spec.validate import validate_spec

    spec = validate_spec(
        {
            "data": {
                "source": source if isinstance(source, list) else str(source),
                "val_fraction": val_fraction,
            },
            "tokenizer": tokenizer,
        }
    )
    tokens = prepare_tokens(spec.data, spec.tokenizer)
    return TextData(
        spec.data.source,
        tokens.tokenizer,
        tokens.train,
        tokens.val,
        spec.tokenizer.model_dump(),
        val_fraction,
    )


class BatchLoader:
    """Random windows of ``seq_len`` tokens, ``batch_size`` at a time; one epoch is as many
    batches as it takes to cover the part once on average."""

    def __init__(self, data: TextData, part: str, batch_size: int, seq_len: int, seed: int) -> None:
        self.data, self.part = data, part
        self.tokens = data.train if part == "train" else data.val
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        if len(self.tokens) <= seq_len + 1:
            raise GptkitError(
                f"the {part} part has {len(self.tokens)} tokens; seq_len {seq_len} needs more"
            )

    def __len__(self) -> int:
        return max(1, len(self.tokens) // (self.batch_size * self.seq_len))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        from gptkit.data.batches import get_batch

        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(len(self)):
            yield get_batch(self.tokens, self.batch_size, self.seq_len, gen, torch.device("cpu"))


def make_loaders(
    data: TextData, batch_size: int = 32, seq_len: int = 128, seed: int = 1337
) -> tuple[BatchLoader, BatchLoader]:
    """Train and validation loaders over the prepared data."""
    return (
        BatchLoader(data, "train", batch_size, seq_len, seed),
        BatchLoader(data, "val", batch_size, seq_len, seed + 1),
    )


def create_model(config: dict[str, Any] | str = "tiny", **fields: Any) -> GPT:
    """A GPT from a config dict (``vocab_size``, ``d_model``, ``n_heads``, ``n_layers``,
    ``d_ff``, ``max_seq_len``, ``dropout``, plus any other model field) or a preset name
    (``tiny``, ``small``, ``large``) with overrides."""
    from gptkit.model import GPT
    from gptkit.spec.models import PRESETS
    from gptkit.spec.validate import validate_spec

    if isinstance(config, str):
        if config not in PRESETS:
            raise GptkitError(f"unknown preset {config!r}; presets: {', '.join(PRESETS)}")
        config = {"preset": config}
    model_fields = {**config, **fields}
    if not model_fields.get("vocab_size"):
        raise GptkitError("create_model needs vocab_size (e.g. data.tokenizer.vocab_size)")
    spec = validate_spec({"model": model_fields}, "create_model config")
    return GPT(spec.model)


class Trainer:
    """Train a model on loaders for some epochs, into ``checkpoint_dir`` (a gptkit run
    directory: checkpoints, metrics, MLflow record). It runs ``gptkit train``'s own loop."""

    def __init__(
        self,
        model: GPT,
        train_loader: BatchLoader,
        val_loader: BatchLoader | None = None,
        lr: float = 1e-3,
        checkpoint_dir: str | Path = "checkpoints",
        warmup_steps: int = 50,
        eval_every: int | None = None,
        track: bool = True,
        **train_fields: Any,
    ) -> None:
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.lr, self.warmup_steps, self.eval_every = lr, warmup_steps, eval_every
        self.checkpoint_dir, self.track, self.train_fields = (
            Path(checkpoint_dir),
            track,
            train_fields,
        )
        self.result: TrainResult | None = None

    def spec(self, epochs: float) -> Any:
        loader = self.train_loader
        if loader.seq_len != self.model.spec.max_seq_len:
            raise GptkitError(
                f"loader seq_len {loader.seq_len} != model max_seq_len "
                f"{self.model.spec.max_seq_len}"
            )
        steps = max(1, round(epochs * len(loader)))
        from gptkit.spec.validate import validate_spec

        return validate_spec(
            {
                "name": self.checkpoint_dir.name or "api",
                "seed": loader.seed,
                "data": {"source": loader.data.source, "val_fraction": loader.data.val_fraction},
                "tokenizer": loader.data.tokenizer_spec,
                "model": self.model.spec.model_dump(),
                "train": {
                    "batch_size": loader.batch_size,
                    "max_steps": steps,
                    "lr": self.lr,
                    "warmup_steps": min(self.warmup_steps, steps // 2),
                    "eval_every": self.eval_every or max(1, steps // 4),
                    "eval_batches": min(20, len(self.val_loader)) if self.val_loader else 5,
                    "sample_tokens": 0,
                    **self.train_fields,
                },
                "tracking": {"enabled": self.track},
            },
            "Trainer",
        )

    def train(self, epochs: float = 1.0, progress: bool = True) -> TrainResult:
        """Train for ``epochs`` passes over the training loader; returns the result (val loss,
        tokens/s, run directory). Calling it again continues from the last checkpoint."""
        from gptkit.store.rundir import RunDir
        from gptkit.training.loop import SpecTrainer

        spec = self.spec(epochs)
        resume = RunDir(self.checkpoint_dir).is_run()
        if resume:  # continue: same model, more steps
            done = self.result.step if self.result else 0
            spec = spec.model_copy(
                update={
                    "train": spec.train.model_copy(
                        update={"max_steps": done + spec.train.max_steps}
                    )
                }
            )
        self.result = SpecTrainer(
            spec, run_dir=self.checkpoint_dir, resume=resume, progress=progress, model=self.model
        ).run()
        return self.result


def attention_map(model: GPT, tokenizer: Any, text: str, layer: int = 0) -> torch.Tensor:
    """Attention weights (H, T, T) of one layer for ``text``: row i is how much token i
    attends to each earlier token. Recomputed from the layer's own projections (built-in
    attention modules: mha, gqa, sliding_window)."""
    import torch

    with torch.no_grad():
        return _attention_weights(model, tokenizer, text, layer)


def _attention_weights(model: GPT, tokenizer: Any, text: str, layer: int) -> torch.Tensor:
    import math

    import torch

    from gptkit.components.attention import CausalSelfAttention

    attn = model.blocks[layer].attn
    if not isinstance(attn, CausalSelfAttention):
        raise GptkitError(
            f"attention_map reads CausalSelfAttention layers, not {type(attn).__name__}"
        )
    seen: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: tuple[Any, ...]) -> None:  # the forward goes on unchanged
        seen["x"] = args[0]

    hook = attn.register_forward_pre_hook(capture)
    ids = torch.tensor([tokenizer.encode(text)])
    was_training = model.training
    model.eval()
    try:
        model(ids)
    finally:
        hook.remove()
        model.train(was_training)
    x = seen["x"]
    B, T, _ = x.shape
    H, H_kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, _ = attn.qkv(x).split([H * hd, H_kv * hd, H_kv * hd], dim=-1)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, H_kv, hd).transpose(1, 2)
    q, k = attn.normalize_qk(q, k)
    positions = torch.arange(T)[None]
    positional: Any = attn.positional
    q, k = positional.rotate(q, k, positions)
    k = k.repeat_interleave(H // H_kv, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    bias = positional.score_bias(T, T)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~attn.allowed(T, T, None, x.device), float("-inf"))
    weights: torch.Tensor = scores.softmax(-1)[0]  # (H, T, T)
    return weights


__all__ = [
    "TextData",
    "prepare_data",
    "BatchLoader",
    "make_loaders",
    "create_model",
    "Trainer",
    "Inference",
    "attention_map",
]
