"""Commands that write a model out or bring one in: ``export``, ``import-hf``, ``export-hf``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli._common import app, echo, require_torch
from gptkit.errors import GptkitError


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory (or runs/<name>).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    quantize: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--quantize", help="int8: dynamic quantization of the matmuls."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="latest, best, or step-N.")] = "latest",
    register: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--register", help="Also register the model in MLflow under this name."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0,
            help="Parity: largest logit difference accepted, relative "
            "to the logits' scale (greedy tokens must agree too).",
        ),
    ] = 1e-4,
) -> None:
    """Export a run to an ONNX bundle with a KV cache, parity-checked against torch."""
    require_torch("export")
    if quantize not in (None, "int8"):
        raise GptkitError(f"--quantize {quantize!r}: the only option is int8")
    from gptkit.export.bundle import export_run

    export_run(
        run, out, quantize=quantize, checkpoint=checkpoint, register=register, tolerance=tolerance
    )


@app.command("import-hf")
def import_hf_cmd(
    src: Annotated[Path, typer.Argument(help="A local Hugging Face GPT-2 folder.")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Run directory to create (default runs/NAME/<time>)."),
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Spec name (default gpt2-import).")] = None,  # noqa: UP045
) -> None:
    """Turn a local GPT-2 checkpoint (config.json + model.safetensors) into a gptkit run."""
    require_torch("import-hf")
    from gptkit.hf import import_hf

    run = import_hf(src, out, name, log=echo)
    echo(
        f"imported {src} -> {run}\n"
        f"  generate:  gptkit generate {run} --prompt ...\n"
        f"  fine-tune: gptkit train {run}/spec.yaml --resume --run-dir {run} "
        f"--set data.source=FILE --set train.max_steps=N\n"
        f"  export:    gptkit export {run} --out BUNDLE"
    )


@app.command("export-hf")
def export_hf_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory of a GPT-2-shaped model.")],
    out: Annotated[Path, typer.Argument(help="Folder to write config.json + model.safetensors.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace config.json / model.safetensors already there.")
    ] = False,
) -> None:
    """Write a run as a Hugging Face GPT-2 folder (GPT2LMHeadModel.from_pretrained loads it)."""
    require_torch("export-hf")
    from gptkit.hf import export_hf

    echo(f"wrote {export_hf(run, out, force=force)}")
