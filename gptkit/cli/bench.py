"""``gptkit bench``: training and generation speed, and the comparison against baselines."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from gptkit.cli._common import JsonOpt, SetOpt, SpecArg, app, echo, require_torch


@app.command()
def bench(
    spec: SpecArg,
    overrides: SetOpt = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="Also time a plain single-file GPT of the same "
            "shape, and Hugging Face generate against gptkit torch / ONNX / server.",
        ),
    ] = False,
    batch: Annotated[
        Optional[int], typer.Option(min=1, help="Training batch (default: the spec's).")  # noqa: UP045
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed training steps.")] = 5,
    gen_tokens: Annotated[int, typer.Option(min=1, help="New tokens per generation run.")] = 256,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the models.")] = False,
    no_onnx: Annotated[bool, typer.Option("--no-onnx", help="Skip onnxruntime.")] = False,
    no_growth: Annotated[
        bool, typer.Option("--no-growth", help="Skip the 64 vs 1024 context step.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Training tokens/s and MFU; generation tokens/s for torch, onnxruntime fp32 and int8."""
    require_torch("bench")
    from gptkit.bench.train import format_report, run_bench
    from gptkit.spec.files import load_spec

    resolved = load_spec(spec, overrides or [])
    report = run_bench(
        resolved,
        batch=batch,
        steps=steps,
        baseline=baseline,
        compile=compile,
        gen_tokens=gen_tokens,
        onnx=not no_onnx,
        context_growth=not no_growth,
        log=lambda m: echo(m, err=True),
    )
    if baseline:  # generation against Hugging Face transformers (the dev extra)
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            echo(
                "gptkit: note: transformers is not installed; skipping the Hugging Face "
                "generate comparison (pip install 'gptkit[dev]')",
                err=True,
            )
        else:
            from gptkit.bench.generate import inference_baseline

            report["inference_baseline"] = inference_baseline(
                new_tokens=gen_tokens, log=lambda m: echo(m, err=True)
            )
    if as_json:
        echo(json.dumps(report, indent=2))
        return
    echo(format_report(report))
    if "inference_baseline" in report:
        from gptkit.bench.generate import format_inference

        echo(format_inference(report["inference_baseline"]))
