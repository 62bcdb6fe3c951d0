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
    from gptkit.bench.train import bench_spec, format_bench
    from gptkit.spec.files import load_spec

    report = bench_spec(
        load_spec(spec, overrides or []),
        batch=batch,
        steps=steps,
        baseline=baseline,
        compile=compile,
        gen_tokens=gen_tokens,
        onnx=not no_onnx,
        context_growth=not no_growth,
        log=lambda m: echo(m, err=True),
    )
    echo(json.dumps(report, indent=2) if as_json else format_bench(report))
