"""The parity gate: the exported graph against the torch model on the same inputs, judged relative
to the logits' own scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.model import GPT

# Parity is judged relative to the logits' own scale (their largest magnitude, at least 1):
# fp32 rounding grows with the size of the numbers, so a fixed absolute bound fails real models
# with peaked logits (GPT-2's are in the hundreds) while a broken export is off by far more.
PARITY_RTOL = 1e-4


def parity_check(
    model: GPT,
    onnx_path: Path,
    decode_steps: int = 32,
    seed: int = 0,
    tolerance: float = PARITY_RTOL,
) -> dict[str, Any]:
    """Run torch and onnxruntime side by side: a prefill, then cached decode steps.

    Passes when every logit differs by at most ``tolerance`` times the logits' scale (the
    largest |logit| torch produced, at least 1) and greedy tokens agree at every step.
    """
    from gptkit.inference.onnx import OnnxModel

    ort_model = OnnxModel(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    V, T = model.spec.vocab_size, min(16, model.spec.max_seq_len - decode_steps - 1)
    if T < 1:  # a short context: a prefill of half of it, decode steps to its end
        T = max(1, model.spec.max_seq_len // 2)
        decode_steps = model.spec.max_seq_len - T  # positions T .. max_seq_len - 1 (none at 1)
    ids = torch.randint(0, V, (2, T), generator=gen)
    mask = np.ones((2, T), dtype=bool)
    pos = np.arange(T)[None].repeat(2, 0)
    with torch.no_grad():
        ref = model(ids, positions=torch.from_numpy(pos))
    logits, past = ort_model.run(ids.numpy(), pos, mask, None, all_logits=True)
    prefill_diff = float(np.abs(logits - ref.logits.numpy()).max())
    scale = float(ref.logits.abs().max())
    decode_diff, greedy_same = 0.0, True
    torch_past = ref.past_key_values
    tok_t = ref.logits[:, -1].argmax(-1, keepdim=True)
    tok_o = torch.from_numpy(logits[:, -1].argmax(-1)[:, None])
    for step in range(decode_steps):
        greedy_same &= bool(torch.equal(tok_t, tok_o))
        p = np.full((2, 1), T + step, dtype=np.int64)
        mask = np.ones((2, T + step + 1), dtype=bool)
        with torch.no_grad():
            out = model(tok_t, positions=torch.from_numpy(p), past_key_values=torch_past)
        logits, past = ort_model.run(tok_t.numpy(), p, mask, past, all_logits=True)
        decode_diff = max(decode_diff, float(np.abs(logits - out.logits.numpy()).max()))
        scale = max(scale, float(out.logits.abs().max()))
        torch_past = out.past_key_values
        tok_t = out.logits[:, -1].argmax(-1, keepdim=True)
        tok_o = torch.from_numpy(logits[:, -1].argmax(-1)[:, None])
    greedy_same &= bool(torch.equal(tok_t, tok_o))
    scale = max(scale, 1.0)
    relative = max(prefill_diff, decode_diff) / scale
    ok = relative <= tolerance and greedy_same
    return {
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "logit_scale": scale,
        "max_rel_diff": relative,
        "decode_steps": decode_steps,
        "greedy_tokens_identical": greedy_same,
        "tolerance": tolerance,
        "passed": ok,
    }
