"""Commands that use a model: ``generate``, ``eval``, ``serve``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gptkit.cli._common import JsonOpt, app, echo, require_torch
from gptkit.errors import GptkitError


@app.command()
def generate(
    run: Annotated[
        Path, typer.Argument(help="A run directory (or runs/<name>), or an export bundle.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--max-new-tokens", "-n", help="Default: the sampler's max_new_tokens."),
    ] = None,
    overrides: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", "-s", help="Override a sampler field, e.g. --set sampler.p=0.9."),
    ] = None,
    seed: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=0, max=2**32 - 1, help="Random seed (repeatable output)."),
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is produced.")] = False,
    num_samples: Annotated[
        int, typer.Option("--num-samples", "-k", min=1, help="Continuations to generate at once.")
    ] = 1,
    stop: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--stop", help="Stop at this string (repeatable; \\n and \\t work)."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="For runs: latest, best, or step-N.")] = "latest",
    device: Annotated[
        str,
        typer.Option(help="For runs: cpu, cuda, mps or auto (bundles run on onnxruntime's CPU)."),
    ] = "cpu",
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute the whole context for every token.")
    ] = False,
    temperature: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0, help="0 means greedy; otherwise divides the logits."),
    ] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Top-k sampling.")] = None,  # noqa: UP045
    top_p: Annotated[
        Optional[float], typer.Option("--top-p", min=0, max=1, help="Nucleus sampling.")  # noqa: UP045
    ] = None,
) -> None:
    """Generate text from a training run (torch) or an export bundle (onnxruntime, no torch)."""
    if max_new_tokens is not None and max_new_tokens < 0:
        raise GptkitError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    from gptkit.inference.decoding import GenerationOptions
    from gptkit.spec.validate import parse_sampler_overrides

    prompt = codecs_unescape(prompt)
    options = GenerationOptions.from_kwargs(
        max_new_tokens=max_new_tokens,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=[codecs_unescape(s) for s in (stop or [])],
        sampler=parse_sampler_overrides(list(overrides or [])),
    )
    gen = _open(run, checkpoint, device)
    gen.check_rows_fit(num_samples)  # before a list of a billion prompts is made
    prompts = [prompt] * num_samples
    if stream and num_samples == 1:
        typer.echo(prompt, nl=False)
        gen.complete(
            prompts,
            options,
            use_cache=not no_cache,
            on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()),
        )
        typer.echo()
        return
    for i, completion in enumerate(gen.complete(prompts, options, use_cache=not no_cache)):
        if num_samples > 1:
            echo(f"--- sample {i + 1} ({completion.finish_reason}) ---")
        echo(prompt + completion.text)


def codecs_unescape(text: str) -> str:
    """'\\n' typed on a command line -> a newline (only simple escapes)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@app.command("eval")
def eval_cmd(
    run: Annotated[
        Path,
        typer.Argument(
            help="A run directory (torch), or an export bundle (onnxruntime; with --data)."
        ),
    ],
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--data", help="A UTF-8 text file to score (default: the run's whole validation split)."
        ),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="latest, best, or step-N.")] = "latest",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 32,
    as_json: JsonOpt = False,
) -> None:
    """Loss, perplexity and bits per byte of a model on a text file, or its mean loss over
    the run's whole validation split."""
    from gptkit.evaluate import evaluate_run
    from gptkit.store.bundle import is_bundle

    if not is_bundle(run):
        require_torch("eval")

    result = evaluate_run(run, data, checkpoint, batch_size)
    if as_json:  # the split's figures without where they came from, as before
        shown = {k: v for k, v in result.items() if k not in ("source", "window")}
        echo(json.dumps(shown))
        return
    if data is None:
        echo(
            f"validation split of {result['source']}: {result['tokens']:,} tokens predicted "
            f"(every one, windows of {result['window']})"
        )
    else:
        echo(f"{data}: {result['tokens']:,} tokens, {result['bytes']:,} bytes")
    echo(f"  loss            {result['loss']:.4f} nats/token")
    echo(f"  perplexity      {result['perplexity']:.3f}")
    if data is not None:
        echo(f"  bits per byte   {result['bits_per_byte']:.4f}")


def _Seconds(what: str) -> Any:  # noqa: N802 (a type, as typer reads it)
    """A server time limit's option: ``Seconds WHAT.``, at least 0.1."""
    return Annotated[float, typer.Option(min=0.1, help=f"Seconds {what}.")]


@app.command()
def serve(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="An export bundle folder (served on onnxruntime) or a training run folder "
            "(served on torch)."
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    max_concurrent: Annotated[
        int, typer.Option(min=1, help="Requests decoded together in the running batch.")
    ] = 16,
    max_queued: Annotated[int, typer.Option(min=0, help="Requests waiting beyond those.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens accepted.")] = 1024,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Open connections; past it the longest idle is closed.")
    ] = 1024,
    body_timeout: _Seconds("a client has to send its request body") = 10.0,
    header_timeout: _Seconds("a client has to send its request headers") = 10.0,
    # Limits' defaults (gptkit.serve.schemas is not imported here: the CLI starts light).
    send_timeout: _Seconds(
        "an answer may wait for a client that reads nothing of it (then it is dropped)"
    ) = 30.0,
    shutdown_timeout: _Seconds("a shutdown (SIGTERM) lets answers under way finish") = 30.0,
    threads: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=1,
            help="onnxruntime threads for a bundle (default: every core but one, for the HTTP "
            "side).",
        ),
    ] = None,
    template_timeout: _Seconds(
        "a chat template may render (in its worker process) before 400"
    ) = 2.0,
    stream_interval: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds between streamed chunks at most (text decoded meanwhile goes out "
            "together; 0: every decode step).",
        ),
    ] = 0.01,
    served_model_name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--served-model-name", help="The model id clients use (default: the spec name)."
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="One stderr line per request.")
    ] = True,
) -> None:
    """Serve an export bundle (onnxruntime) or a training run (torch) over HTTP: OpenAI-style
    /v1/completions and /v1/chat/completions."""
    from gptkit.serve.http import serve as run_server
    from gptkit.serve.schemas import Limits

    limits = Limits(
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        max_tokens=max_tokens,
        max_connections=max_connections,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        send_timeout_s=send_timeout,
        shutdown_timeout_s=shutdown_timeout,
        stream_interval_s=stream_interval,
        template_timeout_s=template_timeout,
    )
    run_server(
        str(bundle), host, port, limits, name=served_model_name, access=access_log, threads=threads
    )


def _open(path: Path, checkpoint: str, device: str) -> Any:
    """The generation object for a bundle (onnxruntime, CPU) or a run (torch, on ``device``)."""
    from gptkit.inference.base import Inference
    from gptkit.store.bundle import is_bundle

    if is_bundle(path):  # a bundle, even a damaged one, says why
        if device != "cpu":
            raise GptkitError(
                f"--device {device}: a bundle runs on onnxruntime's CPU provider",
                "Leave --device out, or generate from the run folder on the GPU.",
            )
        return Inference.load(path, checkpoint=checkpoint)
    require_torch("generate")
    return Inference.load(path, checkpoint=checkpoint, device=str(_run_device(device)))


def _run_device(name: str) -> Any:
    """The torch device ``--device`` names, checked as ``train.device`` is."""
    if name not in ("cpu", "cuda", "auto", "mps"):
        raise GptkitError(f"--device {name!r}: use cpu, cuda, mps or auto")
    from gptkit.training.device import pick_device

    try:
        return pick_device(name)
    except GptkitError as exc:
        raise GptkitError(str(exc).replace("train.device", "--device")) from None
