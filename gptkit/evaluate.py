"""Score a model: the mean loss over a whole token split, or over a text file (loss,
perplexity, bits per byte). A training run is scored on torch; an export bundle on
onnxruntime, with no torch in the process, windowed the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.components.tokenizers import encode_prompt
from gptkit.data.sources import load_text
from gptkit.errors import DataError, GptkitError


def _windows(tokens: Any, T: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``tokens`` cut into consecutive, non-overlapping windows of ``T`` predicted ids,
    ``batch_size`` at a time: (ids (B, width + 1), lengths (B,)). Window ``i`` predicts ids
    ``i*T+1 .. (i+1)*T`` from the ids before them in it, so every id but the first is
    predicted exactly once; only the last window can be shorter (its ids past ``lengths``
    are padding, to be ignored)."""
    n = len(tokens)
    if n < 2:
        raise DataError(f"{n} tokens: nothing to score")
    starts = np.arange(0, n - 1, T)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        width = int(min(T, n - 1 - chunk[0]))
        lengths = np.minimum(width, n - 1 - chunk)
        pos = chunk[:, None] + np.arange(width + 1)
        yield np.asarray(tokens[np.minimum(pos, n - 1)], dtype=np.int64), lengths


def _summary(total: float, count: int) -> dict[str, float]:
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50)),
        "tokens": count,
        "total_nats": total,
    }


def evaluate_tokens(
    model,
    tokens,
    batch_size: int = 32,
    device: Any = "cpu",
    autocast=None,
    block: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss over *every* token of ``tokens`` (e.g. ``TokenData.val``), on torch.

    ``tokens`` is any 1-D array-like (a memory-mapped :class:`~gptkit.data.shards.TokenArray`, an
    ndarray), cut into windows of ``block`` tokens (default: the model's ``max_seq_len``; see
    ``_windows``), in order, so the result is deterministic and memory stays bounded.
    ``autocast``: a context-manager factory (e.g. the trainer's bf16 autocast).

    Returns ``{"loss": mean nats/token, "perplexity", "tokens": count predicted}``.
    """
    import torch

    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, lengths in _windows(tokens, block or model.spec.max_seq_len, batch_size):
            width = ids.shape[1] - 1
            x = torch.from_numpy(ids[:, :-1])
            y = torch.from_numpy(ids[:, 1:].copy())
            y[torch.arange(width)[None, :] >= torch.from_numpy(lengths)[:, None]] = -1
            with autocast():
                logits = model(x.to(device)).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                y.to(device).reshape(-1),
                ignore_index=-1,
                reduction="sum",
            )
            total += float(loss)
            count += int(lengths.sum())
    model.train(was_training)
    return _summary(total, count)


def evaluate_tokens_onnx(gen: Any, tokens: Any, batch_size: int = 8) -> dict[str, float]:
    """:func:`evaluate_tokens` for an export bundle opened with ``gptkit.load``: the same
    windows through its graph on onnxruntime, the loss in float64 with numpy."""
    model = gen.backend.model
    total, count = 0.0, 0
    for ids, lengths in _windows(tokens, gen.backend.max_seq_len, batch_size):
        x, y = ids[:, :-1], ids[:, 1:]
        mask = np.ones(x.shape, dtype=bool)
        positions = np.broadcast_to(np.arange(x.shape[1]), x.shape)
        logits, _ = model.run(x, positions, mask, None, all_logits=True)
        logits = np.asarray(logits, dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        nll = lse - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        kept = np.arange(x.shape[1])[None, :] < lengths[:, None]
        total += float(nll[kept].sum())
        count += int(lengths.sum())
    return _summary(total, count)


def evaluate_text(
    score: Callable[[np.ndarray], dict[str, float]], tokenizer: Any, path: str | Path
) -> dict[str, float]:
    """Every token of the file is predicted once, from up to max_seq_len tokens of context
    (``score``: :func:`evaluate_tokens` or :func:`evaluate_tokens_onnx` of the model).

    The file is cut into consecutive windows of ``max_seq_len`` tokens (the first token of
    each window is only context). Bits per byte divide the total loss by the UTF-8 size of the
    text, which makes models with different tokenizers comparable.
    """
    try:
        text = load_text(str(path))  # a file, a glob or an embedded corpus's name
    except DataError as exc:  # said as the file to score, not as a spec's data.source
        if "file not found" in exc.message:
            raise DataError(
                f"{path}: no such file to score", "Pass a UTF-8 text file with --data."
            ) from None
        raise
    ids = np.asarray(encode_prompt(tokenizer, text, str(path)), dtype=np.int64)
    if len(ids) < 2:
        raise DataError(f"{path} holds fewer than 2 tokens; nothing to score")
    result = score(ids)
    n_bytes = len(text.encode("utf-8"))
    return {
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "bytes": n_bytes,
        "bits_per_byte": result["total_nats"] / (n_bytes * math.log(2)),
    }


def evaluate_run(
    run: str | Path,
    data: str | Path | None = None,
    checkpoint: str = "latest",
    batch_size: int = 32,
) -> dict[str, Any]:
    """``gptkit eval``: a run's model scored on a text file (loss, perplexity, bits per byte),
    or, with no file, its mean loss over the run's whole validation split (``split: "val"``,
    ``source``, ``window``). An export bundle is scored on a text file, on onnxruntime."""
    from gptkit.store.bundle import check_model_path, is_bundle

    check_model_path(Path(run))
    if is_bundle(Path(run)):
        return _evaluate_bundle(run, data, batch_size)
    from gptkit.store.rundir import load_run

    loaded = load_run(run, checkpoint=checkpoint)
    if data is not None:
        model = loaded.model
        return evaluate_text(
            lambda ids: evaluate_tokens(model, ids, batch_size), loaded.tokenizer, data
        )
    from gptkit.data.prepare import prepare_tokens

    spec = loaded.spec
    tokens = prepare_tokens(spec.data, spec.tokenizer).val
    result = evaluate_tokens(loaded.model, tokens, batch_size)
    return {
        "split": "val",
        **{k: v for k, v in result.items() if k != "total_nats"},
        "source": spec.data.source,
        "window": loaded.model.spec.max_seq_len,
    }


def _evaluate_bundle(bundle: str | Path, data: str | Path | None, batch_size: int) -> dict:
    from gptkit.inference.base import Inference

    if data is None:
        raise GptkitError(
            f"{bundle} is an export bundle: it holds no validation split to score",
            "Pass a text file: gptkit eval BUNDLE --data FILE (or the run, for its split).",
        )
    gen = Inference.load(bundle)
    return evaluate_text(
        lambda ids: evaluate_tokens_onnx(gen, ids, batch_size), gen.tokenizer, data
    )
