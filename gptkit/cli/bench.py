"""``gptkit bench``: training and generation speed, and the comparison against baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli._common import JsonOpt, SetOpt, app, echo, require_torch
from gptkit.errors import GptkitError


@app.command()
def bench(
    spec: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="Experiment spec file (.yaml, .yml or .toml); not with --serve."),
    ] = None,
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
    serve: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--serve",
            help="An export bundle or run folder: the runtime's own batch-1 and batch-N "
            "tokens/s next to `gptkit serve`'s with 1 and N concurrent streaming clients.",
        ),
    ] = None,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients for --serve.")] = 8,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds for --serve.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Training tokens/s and MFU; generation tokens/s for torch, onnxruntime fp32 and int8;
    with --serve, the serving path's overhead over its own runtime."""
    if serve is not None:
        _bench_serving(serve, gen_tokens, clients, rounds, as_json)
        return
    if spec is None:
        raise GptkitError("give a spec file, or --serve BUNDLE_OR_RUN", "gptkit bench --help")
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


def _bench_serving(path: Path, tokens: int, clients: int, rounds: int, as_json: bool) -> None:
    from gptkit.bench.serve import format_serving, serving_overhead

    if not path.is_dir():
        raise GptkitError(f"--serve {path}: not a folder", "Give an export bundle or a run folder.")
    report = serving_overhead(
        path, max_tokens=tokens, clients=clients, rounds=rounds, log=lambda m: echo(m, err=True)
    )
    echo(json.dumps(report, indent=2) if as_json else format_serving(report))
