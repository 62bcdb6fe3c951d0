"""Score a model on a text file: loss, perplexity, bits per byte."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gptkit.data import load_text


@torch.no_grad()
def evaluate_text(model, tokenizer, path: str | Path, batch_size: int = 8) -> dict[str, float]:
    """Every token of the file is predicted once, from up to max_seq_len tokens of context.

    The file is cut into consecutive windows of ``max_seq_len`` tokens (the first token of
    each window is only context). Bits per byte divide the total loss by the UTF-8 size of the
    text, which makes models with different tokenizers comparable.
    """
    text = load_text(str(path))
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < 2:
        from gptkit.errors import DataError

        raise DataError(f"{path} holds fewer than 2 tokens; nothing to score")
    T = model.spec.max_seq_len
    model.eval()
    starts = list(range(0, len(ids) - 1, T))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        width = min(T, max(min(T, len(ids) - 1 - s) for s in chunk))
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for row, s in enumerate(chunk):
            n = min(width, len(ids) - 1 - s)
            x[row, :n] = ids[s : s + n]
            y[row, :n] = ids[s + 1 : s + 1 + n]
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum"
        )
        total += loss.item()
        count += int((y >= 0).sum())
    n_bytes = len(text.encode("utf-8"))
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count,
            "bytes": n_bytes, "bits_per_byte": total / (n_bytes * math.log(2))}
