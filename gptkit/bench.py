"""``gptkit bench``: training and generation speed of a spec, measured on this machine.

Every figure is measured in this process, now: the matrix-multiply rate MFU is computed
against, the baseline GPT that gptkit is compared with, torch and onnxruntime side by side.
Compare figures as ratios within one report, not across machines or runs.
"""

from __future__ import annotations

import functools
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT


def matmul_rate(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matrix-multiply rate on the CPU, FLOP/s (2 n^3 per n x n product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L d T for attention (PaLM's
    estimate, as nanoGPT's estimate_mfu uses), N without position tables."""
    s = model.spec
    n = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.positional.parameters()
    )
    return 6 * n + 12 * s.n_layers * s.d_model * s.max_seq_len


def train_speed(
    spec, vocab: int, batch: int, steps: int, warmup: int, baseline: bool, compile: bool
) -> dict[str, Any]:
    """Median seconds per optimizer step for gptkit's GPT (and the plain baseline), alternating
    so that both see the same machine state."""
    from gptkit.baseline import PlainGPT

    torch.manual_seed(0)
    m = spec.model.model_copy(update={"vocab_size": vocab})
    T = m.max_seq_len
    x = torch.randint(0, vocab, (batch, T))
    y = torch.randint(0, vocab, (batch, T))
    model = GPT(m).train()
    opt = spec.train.optimizer.build(model, lr=1e-4)
    fwd = torch.compile(model) if compile else model

    def gptkit_step():
        fwd(x, y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result: dict[str, Any] = {
        "batch": batch,
        "context": T,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model),
    }
    runs = {"gptkit": gptkit_step}
    if baseline:
        plain = PlainGPT(vocab, m.d_model, m.n_heads, m.n_layers, m.hidden_dim, T, m.dropout)
        plain.train()
        popt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        pfwd = torch.compile(plain) if compile else plain

        def baseline_step():
            pfwd(x, y).backward()
            popt.step()
            popt.zero_grad(set_to_none=True)

        runs["baseline"] = baseline_step
    # Alternate short rounds so drift (thermal, other load) hits both alike.
    per = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    for _ in range(steps):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            per[k].append(time.perf_counter() - t)
    for k, ts in per.items():
        sec = statistics.median(ts)
        result[f"{k}_step_s"] = sec
        result[f"{k}_tokens_per_s"] = batch * T / sec
    return result


def generation_speed(
    model: GPT, tokenizer_like, sampler, tokens: int, batches: list[int], onnx_dir: Path | None
) -> dict[str, Any]:
    """Tokens/s for torch (no cache / cache) and onnxruntime (fp32 / int8), greedy."""
    from gptkit.decoding import decode_loop
    from gptkit.generate import TorchBackend

    out: dict[str, Any] = {}
    backends: dict[str, Any] = {
        "torch_no_cache": (TorchBackend(model), False),
        "torch_cache": (TorchBackend(model), True),
    }
    if onnx_dir is not None:
        from gptkit.runtime import OnnxModel, _Backend

        for name in ("fp32", "int8"):
            path = onnx_dir / f"model.{name}.onnx"
            if path.exists():
                backends[f"onnx_{name}"] = (_Backend(OnnxModel(path), model.spec.max_seq_len), True)
    prompt = "\n"
    for b in batches:
        for name, (backend, cache) in backends.items():
            decode_loop(
                backend, tokenizer_like, [prompt] * b, sampler, max_new_tokens=4, use_cache=cache
            )  # warm up
            t = time.perf_counter()
            decode_loop(
                backend,
                tokenizer_like,
                [prompt] * b,
                sampler,
                max_new_tokens=tokens,
                use_cache=cache,
            )
            out[f"{name}_b{b}_tokens_per_s"] = b * tokens / (time.perf_counter() - t)
    return out


def decode_growth(
    model: GPT, onnx_path: Path | None, contexts=(64, 1024), repeats: int = 20
) -> dict[str, Any]:
    """Seconds for one cached decode step at each past length, torch and onnxruntime (each
    with the cache it decodes with: static where every component supports it)."""
    from gptkit.generate import TorchBackend

    backends: dict[str, Any] = {"torch": TorchBackend(model)}
    if onnx_path is not None:
        from gptkit.runtime import OnnxModel, _Backend

        backends["onnx"] = _Backend(OnnxModel(onnx_path), model.spec.max_seq_len)
    res: dict[str, Any] = {}
    for P in contexts:
        for name, backend in backends.items():
            res[f"{name}_decode_s_at_{P}"] = _step_time(
                backend, None, model.spec.vocab_size, P, repeats
            )
    lo, hi = contexts[0], contexts[-1]
    for k in backends:
        res[f"{k}_decode_growth_{lo}_to_{hi}"] = (
            res[f"{k}_decode_s_at_{hi}"] / res[f"{k}_decode_s_at_{lo}"]
        )
    return res


def run_bench(
    spec,
    *,
    batch: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    baseline: bool = False,
    compile: bool = False,
    gen_tokens: int = 256,
    batches: tuple[int, ...] = (1, 8),
    onnx: bool = True,
    context_growth: bool = True,
    log=print,
) -> dict[str, Any]:
    from gptkit.data import prepare_data
    from gptkit.export import export_onnx, quantize_int8
    from gptkit.registry import load_registry

    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    data = prepare_data(spec.data, spec.tokenizer)
    vocab = spec.model.vocab_size or data.tokenizer.vocab_size
    report: dict[str, Any] = {
        "spec": spec.name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    log("measuring the fp32 matrix-multiply rate ...")
    report["matmul_flops"] = matmul_rate()
    log(f"timing training steps (batch {batch or spec.train.batch_size}) ...")
    tr = train_speed(spec, vocab, batch or spec.train.batch_size, steps, warmup, baseline, compile)
    report["train"] = tr
    tr["mfu"] = tr["gptkit_tokens_per_s"] * tr["flops_per_token"] / report["matmul_flops"]
    if baseline:
        tr["baseline_mfu"] = (
            tr["baseline_tokens_per_s"] * tr["flops_per_token"] / report["matmul_flops"]
        )
        tr["gptkit_over_baseline"] = tr["gptkit_tokens_per_s"] / tr["baseline_tokens_per_s"]
    report["peak_rss_mb_after_training"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.manual_seed(0)
    model = GPT(spec.model.model_copy(update={"vocab_size": vocab})).eval()
    greedy = load_registry().get("sampler", "greedy")(kind="greedy", stop_at_eot=False)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = None
        if onnx:
            log("exporting to ONNX (fp32, int8) ...")
            onnx_dir = Path(tmp)
            export_onnx(model, onnx_dir / "model.fp32.onnx")
            quantize_int8(onnx_dir / "model.fp32.onnx", onnx_dir / "model.int8.onnx")
        log(f"timing generation of {gen_tokens} tokens at batch {', '.join(map(str, batches))} ...")
        report["generate"] = {
            "new_tokens": gen_tokens,
            **generation_speed(model, data.tokenizer, greedy, gen_tokens, list(batches), onnx_dir),
        }
        g = report["generate"]
        if onnx and "onnx_fp32_b1_tokens_per_s" in g:
            g["onnx_fp32_over_torch_cache_b1"] = (
                g["onnx_fp32_b1_tokens_per_s"] / g["torch_cache_b1_tokens_per_s"]
            )
            g["onnx_fp32_over_torch_no_cache_b1"] = (
                g["onnx_fp32_b1_tokens_per_s"] / g["torch_no_cache_b1_tokens_per_s"]
            )
            g["onnx_int8_over_fp32_b1"] = (
                g["onnx_int8_b1_tokens_per_s"] / g["onnx_fp32_b1_tokens_per_s"]
            )
        g["torch_cache_over_no_cache_b1"] = (
            g["torch_cache_b1_tokens_per_s"] / g["torch_no_cache_b1_tokens_per_s"]
        )
        if context_growth:
            log("timing one decode step at 64 and 1024 tokens of context ...")
            long_spec = spec.model.model_copy(
                update={"vocab_size": vocab, "max_seq_len": max(1024 + 64, spec.model.max_seq_len)}
            )
            torch.manual_seed(0)
            long_model = GPT(long_spec).eval()
            path = None
            if onnx:
                path = Path(tmp) / "long.onnx"
                export_onnx(long_model, path)
            report["decode_growth"] = decode_growth(long_model, path)
    return report


def format_report(r: dict[str, Any]) -> str:
    t, g = r["train"], r["generate"]
    lines = [
        f"gptkit bench: {r['spec']} | torch {r['torch']} | {r['threads']} threads",
        f"  fp32 matmul rate            {r['matmul_flops'] / 1e9:8.1f} GFLOP/s (measured now)",
        f"  training, batch {t['batch']} x {t['context']}  "
        f"{t['gptkit_tokens_per_s']:8,.0f} tokens/s   "
        f"MFU {t['mfu']:.0%}   ({t['params'] / 1e6:.2f}M params)",
    ]
    if "baseline_tokens_per_s" in t:
        lines.append(
            f"  baseline (plain GPT)        {t['baseline_tokens_per_s']:8,.0f} tokens/s   "
            f"MFU {t['baseline_mfu']:.0%}   gptkit/baseline {t['gptkit_over_baseline']:.3f}"
        )
    lines.append(f"  peak RSS after training     {r['peak_rss_mb_after_training']:8,.0f} MB")
    lines.append(f"  generation, {g['new_tokens']} new tokens (tokens/s):")
    names = ["torch_no_cache", "torch_cache", "onnx_fp32", "onnx_int8"]
    batches = sorted(
        {int(k.split("_b")[1].split("_")[0]) for k in g if "_b" in k and k.endswith("tokens_per_s")}
    )
    lines.append("    " + f"{'':16}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
    for n in names:
        if f"{n}_b{batches[0]}_tokens_per_s" in g:
            lines.append(
                "    "
                + f"{n:16}"
                + "".join(f"{g[f'{n}_b{b}_tokens_per_s']:12,.1f}" for b in batches)
            )
    for k in (
        "torch_cache_over_no_cache_b1",
        "onnx_fp32_over_torch_cache_b1",
        "onnx_fp32_over_torch_no_cache_b1",
        "onnx_int8_over_fp32_b1",
    ):
        if k in g:
            lines.append(f"    {k:34} {g[k]:6.2f}x")
    d = r.get("decode_growth")
    if d:
        for k in ("torch", "onnx"):
            if f"{k}_decode_growth_64_to_1024" in d:
                lines.append(
                    f"  one decode step, {k}: "
                    f"{d[f'{k}_decode_s_at_64'] * 1e3:.2f} ms at 64 tokens, "
                    f"{d[f'{k}_decode_s_at_1024'] * 1e3:.2f} ms at 1024 "
                    f"({d[f'{k}_decode_growth_64_to_1024']:.2f}x)"
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------- inference vs HF


def _greedy_run(
    backend: Any, tokenizer: Any, ids: list[int], new_tokens: int
) -> tuple[list[int], float]:
    """Greedy continuation of token ids through the shared decoding loop: (tokens, seconds)."""
    from gptkit.components.samplers import GreedySpec
    from gptkit.decoding import DecodeBatch

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

    from gptkit.export import MANIFEST, MODEL_FILE, bundle_manifest

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, folder / MODEL_FILE)
    tokenizer.save(folder / "tokenizer")
    manifest = bundle_manifest(folder, spec, model, tokenizer)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@functools.cache
def _http_client() -> Any:
    """This process's HTTP client, kept for every request (as OpenAI's client keeps one):
    building one loads a certificate store, ~40 ms that belong to no request."""
    import httpx

    return httpx.Client(timeout=600)


def _stream_one(url: str, prompt: str, max_tokens: int) -> tuple[float | None, float]:
    """One streaming completion: (seconds to the first text, seconds to the end)."""
    import json

    client = _http_client()
    t0 = time.perf_counter()
    first = None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        for raw in r.iter_lines():
            if raw.startswith("data: {") and json.loads(raw[6:])["choices"][0]["text"]:
                first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


def server_concurrency(
    bundle: Path,
    clients: tuple[int, ...] = (1, 8),
    max_tokens: int = 64,
    prompt: str = "ROMEO:",
    rounds: int = 5,
) -> dict[str, Any]:
    """Aggregate streamed tokens/s and time to first token of N concurrent clients against a
    real ``gptkit serve`` subprocess (over a socket): ``rounds`` rounds of N requests started
    together; tokens/s over all rounds' wall clock, the median first-token time."""
    import multiprocessing as mp
    import subprocess
    import sys
    from concurrent.futures import ProcessPoolExecutor

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptkit",
            "serve",
            str(bundle),
            "--port",
            "0",
            "--no-access-log",
            "--max-tokens",
            str(max_tokens),
        ],
        stdout=subprocess.PIPE,
        stderr=(errors := tempfile.TemporaryFile("w+")),
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if " on " not in line:
            proc.wait(timeout=30)
            errors.seek(0)
            raise GptkitError(f"gptkit serve did not start:\n{errors.read()[-2000:]}")
        url = line.split(" on ", 1)[1].split()[0]
        out: dict[str, Any] = {"max_tokens": max_tokens}
        # Each client in its own process, its HTTP client built when the process starts (and
        # an untimed first round): client threads of one Python process share its GIL and
        # would be what is measured.
        with ProcessPoolExecutor(
            max(clients), mp_context=mp.get_context("spawn"), initializer=_http_client
        ) as pool:
            k = max(clients)
            list(pool.map(_stream_one, [url] * k, [prompt] * k, [max_tokens] * k))  # warm up
            for n in clients:
                wall, results = 0.0, []
                for _ in range(rounds):
                    t = time.perf_counter()
                    results += pool.map(_stream_one, [url] * n, [prompt] * n, [max_tokens] * n)
                    wall += time.perf_counter() - t
                out[f"clients_{n}_tokens_per_s"] = rounds * n * max_tokens / wall
                out[f"clients_{n}_first_token_s"] = statistics.median(r[0] or r[1] for r in results)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
    from gptkit.data import load_corpus
    from gptkit.export import export_onnx, quantize_int8
    from gptkit.generate import TorchBackend
    from gptkit.hf import _model_fields, name_map
    from gptkit.runtime import OnnxModel, _Backend
    from gptkit.spec import validate_spec

    text = load_corpus("tinyshakespeare")
    tok = CharTokenizerSpec().build()
    tok.fit(text)
    ctx = max(contexts) + 64
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
            "onnx_fp32": _Backend(OnnxModel(fp32), ctx),
            "onnx_int8": _Backend(OnnxModel(int8), ctx),
        }

        def hf_generate(ids: list[int], n: int) -> tuple[list[int], float]:
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

        for length in prompts:
            ids = tok.encode(text[1000 : 1000 + length])
            log(f"generating {new_tokens} tokens after a {length}-token prompt ...")
            hf_generate(ids, 4)
            for backend in backends.values():
                _greedy_run(backend, tok, ids, 4)  # warm up
            want, secs = hf_generate(ids, new_tokens)
            row = {"hf_generate_tokens_per_s": new_tokens / secs}
            for name, backend in backends.items():
                got, secs = _greedy_run(backend, tok, ids, new_tokens)
                row[f"{name}_tokens_per_s"] = new_tokens / secs
                row[f"{name}_over_hf"] = (
                    row[f"{name}_tokens_per_s"] / row["hf_generate_tokens_per_s"]
                )
                if name != "onnx_int8":
                    row[f"{name}_same_tokens_as_hf"] = got == want
            report[f"prompt_{length}"] = row
        log("timing one decode step at each context ...")
        growth: dict[str, Any] = {}
        for name in ("gptkit_torch", "onnx_fp32"):
            for c in contexts:
                growth[f"{name}_step_s_at_{c}"] = _step_time(
                    backends[name], tok, tok.vocab_size, c, 20
                )
            growth[f"{name}_growth"] = (
                growth[f"{name}_step_s_at_{contexts[-1]}"]
                / growth[f"{name}_step_s_at_{contexts[0]}"]
            )
        report["decode_growth"] = growth
        log("serving the fp32 bundle to 1 and 8 concurrent streaming clients ...")
        _write_bundle(Path(tmp) / "bundle", fp32, spec, model, tok)
        report["server"] = server_concurrency(Path(tmp) / "bundle")
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
