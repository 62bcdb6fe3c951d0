"""``gptkit bench``: training and generation speed of a spec, measured on this machine.

Every figure is measured in this process, now: the matrix-multiply rate MFU is computed
against, the baseline GPT that gptkit is compared with, torch and onnxruntime side by side.
Compare figures as ratios within one report, not across machines or runs.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gptkit.bench.generate import _step_time
from gptkit.model import GPT
from gptkit.training.device import (
    describe,
    matmul_rate,
    pick_device,
    synchronize,
    tune,
    use_bf16,
)


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L d T for attention (PaLM's
    estimate, as nanoGPT's estimate_mfu uses), N without position tables."""
    s = model.spec
    n = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.positional.parameters()
    )
    return 6 * n + 12 * s.n_layers * s.d_model * s.max_seq_len


def train_speed(
    spec,
    vocab: int,
    batch: int,
    steps: int,
    warmup: int,
    baseline: bool,
    compile: bool,
    device: torch.device | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Median seconds per optimizer step for gptkit's GPT (and the plain baseline), alternating
    so that both see the same machine state; on ``device``, under bf16 autocast if ``bf16``
    (as the trainer runs the spec)."""
    from contextlib import nullcontext

    from gptkit.bench.plain_gpt import PlainGPT

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    m = spec.model.model_copy(update={"vocab_size": vocab})
    T = m.max_seq_len
    x = torch.randint(0, vocab, (batch, T)).to(device)
    y = torch.randint(0, vocab, (batch, T)).to(device)
    model = GPT(m).to(device).train()
    opt = spec.train.optimizer.build(model, lr=1e-4)
    fwd = torch.compile(model) if compile else model

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def gptkit_step():
        with autocast():
            loss = fwd(x, y).loss
        loss.backward()
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
        plain.to(device).train()
        popt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=device.type == "cuda")
        pfwd = torch.compile(plain) if compile else plain

        def baseline_step():
            with autocast():
                loss = pfwd(x, y)
            loss.backward()
            popt.step()
            popt.zero_grad(set_to_none=True)

        runs["baseline"] = baseline_step
    # Alternate short rounds so drift (thermal, other load) hits both alike.
    per = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    for _ in range(steps):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            synchronize(device)
            per[k].append(time.perf_counter() - t)
    for k, ts in per.items():
        sec = statistics.median(ts)
        result[f"{k}_step_s"] = sec
        result[f"{k}_tokens_per_s"] = batch * T / sec
    return result


def generation_speed(
    model: GPT,
    tokenizer_like,
    sampler,
    tokens: int,
    batches: list[int],
    onnx_dir: Path | None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Tokens/s for torch (no cache / cache, on ``device``) and onnxruntime (fp32 / int8, on
    the CPU), greedy."""
    from gptkit.inference.decoding import decode_loop
    from gptkit.inference.torch import TorchBackend

    device = device or torch.device("cpu")
    model = model.to(device)
    out: dict[str, Any] = {}
    backends: dict[str, Any] = {
        "torch_no_cache": (TorchBackend(model, device), False),
        "torch_cache": (TorchBackend(model, device), True),
    }
    if onnx_dir is not None:
        from gptkit.inference.onnx import OnnxBackend, OnnxModel

        for name in ("fp32", "int8"):
            path = onnx_dir / f"model.{name}.onnx"
            if path.exists():
                backends[f"onnx_{name}"] = (
                    OnnxBackend(OnnxModel(path), model.spec.max_seq_len),
                    True,
                )
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
    model: GPT,
    onnx_path: Path | None,
    contexts=(64, 1024),
    repeats: int = 20,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Seconds for one cached decode step at each past length, torch (on ``device``) and
    onnxruntime (each with the cache it decodes with: static where every component supports
    it)."""
    from gptkit.inference.torch import TorchBackend

    device = device or torch.device("cpu")
    backends: dict[str, Any] = {"torch": TorchBackend(model.to(device), device)}
    if onnx_path is not None:
        from gptkit.inference.onnx import OnnxBackend, OnnxModel

        backends["onnx"] = OnnxBackend(OnnxModel(onnx_path), model.spec.max_seq_len)
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
    from gptkit.data.prepare import prepare_tokens
    from gptkit.export.onnx import export_onnx
    from gptkit.export.quantize import quantize_int8
    from gptkit.registry.registry import load_registry

    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    device = pick_device(spec.train.device)  # the spec's device, as training would use it
    bf16 = use_bf16(spec.train.precision, device)
    tune(device)
    data = prepare_tokens(spec.data, spec.tokenizer)
    vocab = spec.model.vocab_size or data.tokenizer.vocab_size
    report: dict[str, Any] = {
        "spec": spec.name,
        "device": describe(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": "bf16" if bf16 else "fp32",
    }
    log(f"measuring the {report['precision']} matrix-multiply rate on {report['device']} ...")
    report["matmul_flops"] = matmul_rate(device, torch.bfloat16 if bf16 else torch.float32)
    log(f"timing training steps (batch {batch or spec.train.batch_size}) ...")
    tr = train_speed(
        spec, vocab, batch or spec.train.batch_size, steps, warmup, baseline, compile, device, bf16
    )
    report["train"] = tr
    _training_ratios(tr, report["matmul_flops"], baseline)
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
            **generation_speed(
                model, data.tokenizer, greedy, gen_tokens, list(batches), onnx_dir, device
            ),
        }
        _generation_ratios(report["generate"])
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
            report["decode_growth"] = decode_growth(long_model, path, device=device)
    return report


def _training_ratios(tr: dict[str, Any], matmul_flops: float, baseline: bool) -> None:
    """MFU against the measured matmul rate, and gptkit over the plain GPT."""
    tr["mfu"] = tr["gptkit_tokens_per_s"] * tr["flops_per_token"] / matmul_flops
    if baseline:
        tr["baseline_mfu"] = tr["baseline_tokens_per_s"] * tr["flops_per_token"] / matmul_flops
        tr["gptkit_over_baseline"] = tr["gptkit_tokens_per_s"] / tr["baseline_tokens_per_s"]


def _generation_ratios(g: dict[str, Any]) -> None:
    """Each generation path against the one it replaces, at batch 1."""
    if "onnx_fp32_b1_tokens_per_s" in g:
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


def format_report(r: dict[str, Any]) -> str:
    t, g = r["train"], r["generate"]
    lines = [
        f"gptkit bench: {r['spec']} | torch {r['torch']} | {r.get('device', 'cpu')}",
        f"  {r.get('precision', 'fp32')} matmul rate            "
        f"{r['matmul_flops'] / 1e9:8.1f} GFLOP/s (measured now on that device: MFU's peak)",
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


def bench_spec(spec: Any, *, baseline: bool = False, log=print, **options: Any) -> dict[str, Any]:
    """``gptkit bench``: :func:`run_bench` on ``spec``, and with ``baseline`` the comparison
    against Hugging Face ``generate`` when transformers is installed (else a note is logged)."""
    report = run_bench(spec, baseline=baseline, log=log, **options)
    if not baseline:
        return report
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        log(
            "gptkit: note: transformers is not installed; skipping the Hugging Face "
            "generate comparison (pip install 'gptkit[dev]')"
        )
        return report
    from gptkit.bench.generate import inference_baseline

    report["inference_baseline"] = inference_baseline(
        new_tokens=options.get("gen_tokens", 256), log=log
    )
    return report


def format_bench(report: dict[str, Any]) -> str:
    """The whole bench report as text: training and generation, then the comparison."""
    text = format_report(report)
    if "inference_baseline" in report:
        from gptkit.bench.generate import format_inference

        text += "\n" + format_inference(report["inference_baseline"])
    return text
