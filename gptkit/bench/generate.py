"""The inference comparison (``gptkit bench --baseline``): gptkit on torch and onnxruntime against
Hugging Face ``generate`` with the same weights, and the server under concurrent clients."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.model import GPT


def _greedy_run(
    backend: Any, tokenizer: Any, ids: list[int], new_tokens: int
) -> tuple[list[int], float]:
    """Greedy continuation of token ids through the shared decoding loop: (tokens, seconds)."""
    from gptkit.components.samplers import GreedySpec
    from gptkit.inference.decoding import DecodeBatch

    batch = DecodeBatch(backend, tokenizer)
    greedy = GreedySpec(stop_at_eot=False)
    t = time.perf_counter()
    row = batch.add(list(ids), greedy, np.random.default_rng(0), new_tokens)
    while len(batch):
        batch.step()
    return row.stream.tokens, time.perf_counter() - t


def _step_time(backend: Any, tokenizer_like: Any, vocab: int, context: int, repeats: int) -> float:
    """Median seconds of one cached decode step with ``context`` tokens already cached."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, (1, context), dtype=np.int64)
    mask = np.ones((1, context), dtype=bool)
    _, past = backend(ids, np.arange(context)[None], mask, None)
    times = []
    for i in range(repeats):
        mask = np.ones((1, context + i + 1), dtype=bool)
        t = time.perf_counter()
        _, past = backend(ids[:, -1:], np.array([[context + i]]), mask, past)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:] or times)


def _write_bundle(folder: Path, onnx_file: Path, spec: Any, model: GPT, tokenizer: Any) -> None:
    """A bundle around an exported graph (for serving it in the benchmark)."""
    import json
    import shutil

    from gptkit.export.bundle import bundle_manifest
    from gptkit.store.bundle import MANIFEST, MODEL_FILE

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, folder / MODEL_FILE)
    tokenizer.save(folder / "tokenizer")
    manifest = bundle_manifest(folder, spec, model, tokenizer)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def server_concurrency(
    bundle: Path,
    clients: tuple[int, ...] = (1, 8),
    max_tokens: int = 64,
    prompt: str = "ROMEO:",
    rounds: int = 5,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Aggregate streamed tokens/s and time to first token of N concurrent greedy clients
    against a real ``gptkit serve`` subprocess (``gptkit.bench.serve`` does the measuring);
    with the bundle's ``tokenizer``, each client sends a prompt of its own."""
    from gptkit.bench.serve import concurrent_clients, distinct_prompts, running_server

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    prompts = distinct_prompts(tokenizer, prompt, max(clients)) if tokenizer else None
    with running_server(bundle, "--max-tokens", str(max_tokens)) as url:
        return {
            "max_tokens": max_tokens,
            **concurrent_clients(url, body, clients, rounds, prompts),
        }


def _gpt2_pair(tok: Any, ctx: int) -> tuple[Any, Any, GPT]:
    """A random GPT-2-shaped Hugging Face model (6 layers, 6 heads, 384 wide) and gptkit's GPT
    holding the same weights, with the spec that describes it."""
    import transformers

    from gptkit.hf import _model_fields, name_map
    from gptkit.spec.validate import validate_spec

    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=ctx,
        n_embd=384,
        n_layer=6,
        n_head=6,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    spec = validate_spec(
        {
            "name": "bench",
            "model": _model_fields(config.to_dict()),
            "tokenizer": {"kind": "char"},
            "sampler": {"kind": "greedy", "stop_at_eot": False},  # every client: 64 tokens
        },
        "bench",
    )
    model = GPT(spec.model).eval()
    weights = hf.transformer.state_dict()
    model.load_state_dict(
        {ours: weights[theirs].t() if tr else weights[theirs] for ours, theirs, tr in name_map(6)},
        strict=False,
    )
    return hf, spec, model


def _hf_generate(hf: Any, tok: Any, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy ``generate``: the new tokens and the seconds they took."""
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        # An explicit mask: generate would otherwise mask every prompt token equal to
        # pad_token_id.
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.eot_id,
            eos_token_id=None,
        )
    return out[0, len(ids) :].tolist(), time.perf_counter() - t


def _against_hf(
    hf: Any, backends: dict[str, Any], tok: Any, ids: list[int], new_tokens: int
) -> dict[str, Any]:
    """Tokens/s of ``generate`` and of each backend after one prompt, their ratios, and
    whether the fp32 paths chose the same tokens."""
    _hf_generate(hf, tok, ids, 4)
    for backend in backends.values():
        _greedy_run(backend, tok, ids, 4)  # warm up
    want, secs = _hf_generate(hf, tok, ids, new_tokens)
    row: dict[str, Any] = {"hf_generate_tokens_per_s": new_tokens / secs}
    for name, backend in backends.items():
        got, secs = _greedy_run(backend, tok, ids, new_tokens)
        row[f"{name}_tokens_per_s"] = new_tokens / secs
        row[f"{name}_over_hf"] = row[f"{name}_tokens_per_s"] / row["hf_generate_tokens_per_s"]
        if name != "onnx_int8":
            row[f"{name}_same_tokens_as_hf"] = got == want
    return row


def _context_growth(backends: dict[str, Any], tok: Any, contexts: tuple[int, ...]) -> dict:
    """One decode step's time at each context, and the longest over the shortest."""
    growth: dict[str, Any] = {}
    for name in ("gptkit_torch", "onnx_fp32"):
        for c in contexts:
            growth[f"{name}_step_s_at_{c}"] = _step_time(backends[name], tok, tok.vocab_size, c, 20)
        growth[f"{name}_growth"] = (
            growth[f"{name}_step_s_at_{contexts[-1]}"] / growth[f"{name}_step_s_at_{contexts[0]}"]
        )
    return growth


def inference_baseline(
    new_tokens: int = 256,
    prompts: tuple[int, ...] = (16, 700),
    contexts: tuple[int, ...] = (64, 1024),
    log=print,
) -> dict[str, Any]:
    """Hugging Face transformers ``generate`` against gptkit (torch with the static cache,
    onnxruntime fp32 and int8) on the same random GPT-2-shaped weights (6 layers, 6 heads,
    384 wide, Tiny Shakespeare's characters), greedy, batch 1, alternating in this process."""
    import transformers

    from gptkit.components.tokenizers import CharTokenizerSpec
    from gptkit.data.sources import load_corpus
    from gptkit.export.onnx import export_onnx
    from gptkit.export.quantize import quantize_int8
    from gptkit.inference.onnx import OnnxBackend, OnnxModel
    from gptkit.inference.torch import TorchBackend

    text = load_corpus("tinyshakespeare")
    tok = CharTokenizerSpec().build()
    tok.fit(text)
    ctx = max(contexts) + 64
    hf, spec, model = _gpt2_pair(tok, ctx)
    report: dict[str, Any] = {
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        log("exporting the GPT-2-shaped model to ONNX (fp32, int8) ...")
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32)
        quantize_int8(fp32, int8)
        backends = {
            "gptkit_torch": TorchBackend(model),
            "onnx_fp32": OnnxBackend(OnnxModel(fp32), ctx),
            "onnx_int8": OnnxBackend(OnnxModel(int8), ctx),
        }
        for length in prompts:
            ids = tok.encode(text[1000 : 1000 + length])
            log(f"generating {new_tokens} tokens after a {length}-token prompt ...")
            report[f"prompt_{length}"] = _against_hf(hf, backends, tok, ids, new_tokens)
        log("timing one decode step at each context ...")
        report["decode_growth"] = _context_growth(backends, tok, contexts)
        log("serving the fp32 bundle to 1 and 8 concurrent streaming clients ...")
        _write_bundle(Path(tmp) / "bundle", fp32, spec, model, tok)
        report["server"] = server_concurrency(Path(tmp) / "bundle", tokenizer=tok)
    s = report["server"]
    s["clients_8_over_1_tokens_per_s"] = s["clients_8_tokens_per_s"] / s["clients_1_tokens_per_s"]
    s["clients_8_over_1_first_token"] = s["clients_8_first_token_s"] / s["clients_1_first_token_s"]
    return report


def format_inference(r: dict[str, Any]) -> str:
    lines = [
        f"inference vs Hugging Face transformers {r['transformers']} generate "
        f"(same random GPT-2-shaped weights, greedy, batch 1, {r['new_tokens']} new tokens, "
        f"{r['threads']} threads):",
        f"    {'prompt':>8} {'HF tok/s':>10} {'torch':>16} {'onnx fp32':>16} {'onnx int8':>16}",
    ]
    for key in [k for k in r if k.startswith("prompt_")]:
        row = r[key]
        cells = "".join(
            f"{row[f'{n}_tokens_per_s']:9.1f} ({row[f'{n}_over_hf']:.2f}x)"
            for n in ("gptkit_torch", "onnx_fp32", "onnx_int8")
        )
        same = all(row[k] for k in row if k.endswith("same_tokens_as_hf"))
        lines.append(
            f"    {key[7:]:>8} {row['hf_generate_tokens_per_s']:10.1f} {cells}"
            f"   tokens identical to HF: {same}"
        )
    g = r["decode_growth"]
    for name in ("gptkit_torch", "onnx_fp32"):
        steps = [k for k in g if k.startswith(f"{name}_step_s_at_")]
        lines.append(
            f"    decode step, {name}: "
            + ", ".join(f"{g[k] * 1e3:.2f} ms at {k.rsplit('_', 1)[1]}" for k in steps)
            + f" ({g[f'{name}_growth']:.2f}x)"
        )
    s = r["server"]
    lines.append(
        f"    server, {s['max_tokens']} streamed tokens each: 1 client "
        f"{s['clients_1_tokens_per_s']:.1f} tok/s, first token "
        f"{s['clients_1_first_token_s'] * 1e3:.0f} ms; 8 clients "
        f"{s['clients_8_tokens_per_s']:.1f} tok/s ({s['clients_8_over_1_tokens_per_s']:.2f}x), "
        f"first token {s['clients_8_first_token_s'] * 1e3:.0f} ms "
        f"({s['clients_8_over_1_first_token']:.2f}x)"
    )
    return "\n".join(lines)
