"""Score a model: the mean loss over a whole token split, or over a text file (loss,
perplexity, bits per byte)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.data.sources import load_text
from gptkit.errors import RunError


@torch.no_grad()
def evaluate_tokens(
    model,
    tokens,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast=None,
    block: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss over *every* token of ``tokens`` (e.g. ``TokenData.val``).

    ``tokens`` is any 1-D array-like (a memory-mapped :class:`~gptkit.data.shards.TokenArray`, an
    ndarray). It is cut into consecutive, non-overlapping windows of ``block`` tokens (default:
    the model's ``max_seq_len``); window ``i`` predicts ids ``i*block+1 .. (i+1)*block`` from
    the ids before them in the window, so every id but the first is predicted exactly once. The
    last window may be shorter (its padding is ignored). Windows go ``batch_size`` at a time,
    in order, so the result is deterministic and memory stays bounded. ``autocast``: a
    context-manager factory (e.g. the trainer's bf16 autocast).

    Returns ``{"loss": mean nats/token, "perplexity", "tokens": count predicted}``.
    """
    T = block or model.spec.max_seq_len
    n = len(tokens)
    if n < 2:
        from gptkit.errors import DataError

        raise DataError(f"{n} tokens: nothing to score")
    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    starts = np.arange(0, n - 1, T)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        width = int(min(T, n - 1 - chunk[0]))  # only the last window can be shorter
        lengths = np.minimum(width, n - 1 - chunk)
        pos = chunk[:, None] + np.arange(width + 1)
        ids = np.asarray(tokens[np.minimum(pos, n - 1)], dtype=np.int64)
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
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50)),
        "tokens": count,
        "total_nats": total,
    }


@torch.no_grad()
def evaluate_text(model, tokenizer, path: str | Path, batch_size: int = 8) -> dict[str, float]:
    """Every token of the file is predicted once, from up to max_seq_len tokens of context.

    The file is cut into consecutive windows of ``max_seq_len`` tokens (the first token of
    each window is only context). Bits per byte divide the total loss by the UTF-8 size of the
    text, which makes models with different tokenizers comparable.
    """
    text = load_text(str(path))
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < 2:
        from gptkit.errors import DataError

        raise DataError(f"{path} holds fewer than 2 tokens; nothing to score")
    result = evaluate_tokens(model, ids, batch_size)
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
    ``source``, ``window``)."""
    from gptkit.store.bundle import MANIFEST
    from gptkit.store.rundir import load_run

    if (Path(run) / MANIFEST).is_file():
        raise RunError(
            f"{run} is an export bundle; gptkit eval scores a training run (on torch)",
            "Pass the run it was exported from (its manifest names it: source_run).",
        )
    loaded = load_run(run, checkpoint=checkpoint)
    if data is not None:
        return evaluate_text(loaded.model, loaded.tokenizer, data, batch_size)
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
