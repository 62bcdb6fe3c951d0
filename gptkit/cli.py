"""The ``gptkit`` command line. Every error a user can cause ends in a message and exit code 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gptkit.errors import GptkitError

app = typer.Typer(
    name="gptkit",
    help="Build, train, compare and ship small GPT-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SpecArg = Annotated[Path, typer.Argument(help="Experiment spec file (.yaml, .yml or .toml).")]
SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", "-s", help="Override a field: --set model.dropout=0.1 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


STARTED = time.time()  # the command's start: a run's MLflow start time is this


@app.callback()
def _options(
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer needs Optional here
        typer.Option(
            "--plugin",
            help="Trust and load this plugin module, even when a run or "
            "bundle names it (repeatable; like GPTKIT_PLUGINS).",
        ),
    ] = None,
) -> None:
    """Build, train, compare and ship small GPT-style language models."""
    if plugin:
        from gptkit.plugins import allow_plugin_modules

        allow_plugin_modules(plugin)
        # Loaded like GPTKIT_PLUGINS, so every command (and its subprocesses) sees them.
        current = [m for m in os.environ.get("GPTKIT_PLUGINS", "").split(",") if m.strip()]
        os.environ["GPTKIT_PLUGINS"] = ",".join(dict.fromkeys([*current, *plugin]))


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    typer.echo(text, err=err, nl=nl)


def require_torch(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise GptkitError(
            f"'gptkit {command}' needs PyTorch, which is not installed",
            "Install the training extra: pip install 'gptkit[train]'.",
        )


def warn_plugin_problems(registry) -> None:
    for problem in registry.problems:
        echo(f"gptkit: warning: {problem}", err=True)


# --------------------------------------------------------------------------- plugins, schema


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List every plugin (name, version, origin) and the components it registers, by slot."""
    from gptkit.registry import SLOTS, load_registry

    registry = load_registry()
    if as_json:
        doc = {
            "plugins": [vars(i) for i in registry.pm.infos],
            "components": {
                slot: {
                    k: {"provider": r.provider, "version": r.version, "class": r.cls.__name__}
                    for k, r in sorted(registry.components[slot].items())
                }
                for slot in SLOTS
            },
            "problems": registry.problems,
        }
        echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "version", "origin", "status"):
        table.add_column(col)
    for info in registry.pm.infos:
        table.add_row(info.name, info.version, info.origin, info.error or "ok")
    console.print(table)
    table = Table(title="components", title_justify="left")
    for col in ("slot", "kind", "spec class", "provider"):
        table.add_column(col)
    for slot in SLOTS:
        for kind, reg in sorted(registry.components[slot].items()):
            table.add_row(slot, kind, reg.cls.__name__, f"{reg.provider} {reg.version}")
    console.print(table)
    warn_plugin_problems(registry)


@app.command()
def schema(
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--plugin", "-p", help="Also load this plugin module (repeatable)."),
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="A readable reference of every field instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of the experiment spec, after plugins load (for editors)."""
    from gptkit.registry import load_registry
    from gptkit.spec import spec_class

    registry = load_registry(tuple(plugin or ()))
    warn_plugin_problems(registry)
    if markdown:
        from gptkit.docs import spec_reference_markdown

        echo(spec_reference_markdown(registry), nl=False)
        return
    echo(json.dumps(spec_class(registry).model_json_schema(), indent=2))


# --------------------------------------------------------------------------- validate


@app.command()
def validate(
    spec: SpecArg,
    overrides: SetOpt = None,
    print_spec: Annotated[
        bool,
        typer.Option(
            "--print-spec",
            help="Print the resolved spec as YAML (what a run "
            "stores), each field marked with the file, --set or default it "
            "came from.",
        ),
    ] = False,
) -> None:
    """Check a spec and print the resolved model (parameters, components) without training."""
    from gptkit.compose import compose_spec_file, validate_composed

    composed = compose_spec_file(spec)
    resolved = validate_composed(composed, str(spec), overrides or [])
    from gptkit.registry import load_registry

    registry = load_registry(tuple(resolved.plugins))
    warn_plugin_problems(registry)
    if print_spec:
        echo(_explained_spec(composed, resolved, overrides or []))
        return
    sweep = _sweep_size(resolved) if resolved.sweep or resolved.repeats > 1 else None
    m = resolved.model
    echo(f"{spec}: valid")
    echo(f"  name        {resolved.name}")
    from gptkit.components.base import SLOTS

    for slot, entry in SLOTS.items():
        component: Any = resolved
        for key in entry.path:
            component = getattr(component, key)
        reg = registry.components[slot][component.kind]
        fields = component.model_dump(exclude={"kind"}, exclude_defaults=slot == "sampler")
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        echo(f"  {slot:<11} {component.kind} {extra}  [{reg.provider}]".rstrip())
    echo(
        f"  model       {m.n_layers} layers, {m.n_heads} heads, d_model {m.d_model}, "
        f"d_ff {m.hidden_dim}, max_seq_len {m.max_seq_len}, dropout {m.dropout}, "
        f"{m.norm}, {m.activation}"
    )
    if sweep:
        echo(f"  sweep       {sweep}")
    vocab = m.vocab_size
    if vocab is None:
        vocab = _vocab_size_from_tokenizer(resolved)
    try:
        import torch

        from gptkit.model import build_model
    except ImportError:
        echo("  parameters  (install gptkit[train] to count them)")
        return
    with torch.device("meta"):  # count without allocating
        model = build_model(resolved, vocab_size=vocab)
    total = model.num_params(non_embedding=False)
    echo(f"  vocab_size  {vocab}")
    echo(f"  parameters  {total / 1e6:.2f}M ({total:,})")


def _sweep_size(resolved) -> str:
    """``2 points x 3 seeds = 6 runs`` (and the grid's errors, before anything trains)."""
    try:
        from gptkit.training.sweep import sweep_plan
    except ImportError:  # the sweep runner needs torch; the count does not
        return "(install gptkit[train] to count the runs)"
    plan = sweep_plan(resolved)
    runs = sum(len(r) for _, r in plan)
    seeds = f" x {len(plan[0][1])} seeds" if runs > len(plan) else ""
    return f"{len(plan)} point{'s' * (len(plan) != 1)}{seeds} = {runs} runs"


def _explained_spec(composed, resolved, sets: list[str]) -> str:
    """The resolved spec as YAML, each field marked with where its value came from."""
    from gptkit.compose import annotated_yaml
    from gptkit.spec import PRESETS, parse_override

    set_paths = [tuple(parse_override(s)[0]) for s in sets]
    preset = resolved.model.preset

    def origin_of(path: tuple[str, ...]) -> str:
        if any(path[: len(p)] == p or p[: len(path)] == path for p in set_paths):
            return "--set"
        found = composed.origin(path)
        if found is None and preset and path[:1] == ("model",) and path[-1] in PRESETS[preset]:
            return f"preset {preset} ({composed.origin(('model', 'preset'))})"
        return f"from {found}" if found else "default"

    lines = [f"# resolved from: {' <- '.join(reversed(composed.files))}"]
    return "\n".join([*lines, annotated_yaml(resolved.to_dict(), origin_of)])


def _vocab_size_from_tokenizer(spec) -> int:
    from gptkit.data import fit_tokenizer

    return fit_tokenizer(spec.data, spec.tokenizer).vocab_size  # on a bounded sample


@app.command()
def prepare(
    spec: SpecArg,
    overrides: SetOpt = None,
    workers: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--workers",
            min=1,
            help="Tokenizing processes (default: every core for char/byte on large corpora).",
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize the spec's corpus ahead of training into sharded, memory-mapped token files
    (reused by 'gptkit train'), and print the shard layout."""
    import time

    from gptkit.data import prepare_data
    from gptkit.spec import load_spec

    resolved = load_spec(spec, overrides or [])
    started = time.perf_counter()
    data = prepare_data(
        resolved.data, resolved.tokenizer, progress=not no_progress, workers=workers
    )
    elapsed = time.perf_counter() - started
    meta = data.meta
    layout = {
        "cache": str(data.folder),
        "reused": data.cached,
        "tokenizer": resolved.tokenizer.kind,
        "vocab_size": data.tokenizer.vocab_size,
        "eot_id": data.tokenizer.eot_id,
        "dtype": meta["dtype"],
        "tokens": meta["tokens"],
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "documents": meta["documents"],
        "source_bytes": meta["source_bytes"],
        "seconds": round(elapsed, 3),
        "shards": meta["shards"],
    }
    if as_json:
        echo(json.dumps(layout))
        return
    mb = meta["source_bytes"] / 1e6
    how = (
        "reused the cache"
        if data.cached
        else (
            f"tokenized in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.1f} MB/s, "
            f"{meta['workers']} process{'es' if meta['workers'] > 1 else ''})"
        )
    )
    echo(f"{resolved.data.source}: {mb:,.1f} MB, {meta['documents']:,} documents; {how}")
    echo(
        f"  tokenizer   {resolved.tokenizer.kind}, vocab {data.tokenizer.vocab_size:,}, "
        f"end-of-text id {data.tokenizer.eot_id}, ids as {meta['dtype']}"
    )
    echo(f"  cache       {data.folder}")
    for shard in meta["shards"]:
        echo(f"  {shard['file']}  {shard['tokens']:>14,} tokens")
    echo(
        f"  train       {len(data.train):>14,} tokens (first {1 - resolved.data.val_fraction:.0%})"
    )
    echo(f"  validation  {len(data.val):>14,} tokens (last {resolved.data.val_fraction:.0%})")


# --------------------------------------------------------------------------- train, generate, eval


@app.command()
def train(
    spec: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(
            help="Experiment spec file (.yaml, .yml or .toml); with --resume "
            "--run-dir it may be left out (the run's own spec is used)."
        ),
    ] = None,
    overrides: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the newest run of this spec (or --run-dir) "
            "exactly as it was started; --set changes fields on purpose.",
        ),
    ] = False,
    run_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--run-dir", help="Run directory (default runs/<name>/<time>)."),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", help="Run name (default: the spec's name and the --set changes)."),
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Plain log lines only.")
    ] = False,
) -> None:
    """Validate SPEC, prepare data, train with progress, checkpoint, and track in MLflow."""
    require_torch("train")
    from gptkit.training.loop import Trainer
    from gptkit.training.rundir import default_run_name

    sets = list(overrides or [])
    if resume:
        resolved, run_dir = _resume_spec(spec, run_dir, sets)
    else:
        if spec is None:
            raise GptkitError("gptkit train needs a SPEC file (or --resume --run-dir RUN)")
        from gptkit.compose import compose_spec_file, validate_composed

        composed = compose_spec_file(spec)  # with the files it extends merged in
        raw = composed.data
        resolved = validate_composed(composed, str(spec), sets)
        if resolved.sweep or resolved.repeats > 1:
            _train_sweep(raw, spec, sets, resolved, run_dir, not no_progress)
            return
    trainer = Trainer(
        resolved,
        run_dir=run_dir,
        resume=resume,
        progress=not no_progress,
        run_name=name or (None if resume else default_run_name(resolved.name, sets)),
        overrides=sets,
        command=_command_line(),
        started_at=STARTED,
    )
    result = trainer.run()
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    if resolved.export.onnx:  # export: {onnx: true} in the spec: a bundle inside the run
        from gptkit.export import export_run

        export_run(result.run_dir, trainer.rundir.default_bundle, quantize=resolved.export.quantize)
    echo(_train_report(result))


def _command_line() -> str:
    import shlex

    return "gptkit " + shlex.join(sys.argv[1:])


def _resume_spec(spec_file: Path | None, run_dir: Path | None, sets: list[str]):
    """The run's own spec (what was asked), with this command's --set changes on top."""
    from gptkit.spec import load_spec
    from gptkit.training.rundir import RUNS_ROOT, RunDir

    from_file = load_spec(spec_file, sets) if spec_file is not None else None
    if run_dir is None:
        if from_file is None:
            raise GptkitError("--resume needs --run-dir RUN or a SPEC whose newest run to continue")
        found = RunDir.latest(RUNS_ROOT / from_file.name)
        if found is None:
            raise GptkitError(
                f"nothing to resume: no run of '{from_file.name}' under "
                f"{RUNS_ROOT / from_file.name}",
                "Start it without --resume.",
            )
        echo(f"gptkit: resuming {found.path} (newest run of '{from_file.name}')", err=True)
        run_dir = found.path
    run = RunDir(run_dir)
    if not run.is_run():
        raise GptkitError(
            f"nothing to resume in {run_dir}: it is not a gptkit run (no spec.yaml)",
            "Start it without --resume.",
        )
    resolved = run.read_spec(sets)
    if from_file is not None:
        _warn_spec_file_ignored(spec_file, from_file, resolved)
    return resolved, run.path


def _warn_spec_file_ignored(path: Path, from_file, resolved) -> None:
    from gptkit.training.loop import spec_diff

    diffs = [
        (k, a, b)
        for k, a, b in spec_diff(resolved.to_dict(), from_file.to_dict())
        if k != "model.vocab_size"
    ]
    if diffs:
        shown = "; ".join(f"{k}: {a!r} in the run, {b!r} in {path.name}" for k, a, b in diffs[:5])
        echo(
            f"gptkit: warning: the run continues its own spec; {path} differs and is not "
            f"applied ({shown}). Pass --set FIELD=VALUE to change a field on purpose.",
            err=True,
        )


def _train_sweep(raw, spec: Path, sets: list[str], resolved, run_dir, progress: bool) -> None:
    from gptkit.training.sweep import run_sweep

    results = run_sweep(
        raw, str(spec), sets, resolved, run_dir, progress=progress, command=_command_line()
    )
    echo("sweep done:")
    for r in results:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        echo(f"  {r['point']:<40} val loss {val}  {r['run_dir']}")


def _train_report(result) -> str:
    if result.steps_trained == 0:
        return (
            f"nothing to train: the run is already at step {result.step} "
            f"(raise it with --set train.max_steps=N)\nrun: {result.run_dir}"
        )
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    if result.stop_reason == "early_stop":
        val += " (stopped early: train.early_stop)"
    return (
        f"done: {result.steps_trained} steps (now at step {result.step}) in "
        f"{result.elapsed:.1f}s, val loss {val}, {result.tokens_per_sec:,.0f} tokens/s"
        f"\nrun: {result.run_dir}"
    )


@app.command("runs")
def runs_cmd(
    experiment: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="Only the runs of this spec name (a folder under runs/)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs newest first: name, status, steps, best/final val loss, tokens/s, wall time."""
    from gptkit.training.listing import format_rows, list_runs
    from gptkit.training.rundir import RUNS_ROOT

    if experiment and not (RUNS_ROOT / experiment).is_dir():
        have = (
            sorted(p.name for p in RUNS_ROOT.iterdir() if p.is_dir()) if RUNS_ROOT.is_dir() else []
        )
        raise GptkitError(
            f"no runs of '{experiment}' under {RUNS_ROOT}/; there are runs of: "
            f"{', '.join(have) or '(none)'}"
        )
    rows = list_runs(experiment)
    if as_json:
        echo(json.dumps(rows, indent=2))
        return
    if not rows:
        echo(f"no runs under {RUNS_ROOT}/ yet. Train one: gptkit train SPEC")
        return
    _print_table(format_rows(rows))


def _print_table(grid: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in grid[0]:
        t.add_column(col)
    for row in grid[1:]:
        t.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(t)


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
    seed: Annotated[Optional[int], typer.Option(help="Random seed (repeatable output).")] = None,  # noqa: UP045
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is produced.")] = False,
    num_samples: Annotated[
        int, typer.Option("--num-samples", "-k", min=1, help="Continuations to generate at once.")
    ] = 1,
    stop: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--stop", help="Stop at this string (repeatable; \\n and \\t work)."),
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="For runs: latest, best, or step-N.")] = "latest",
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
    from gptkit.api import Inference
    from gptkit.decoding import GenerationOptions

    prompt = codecs_unescape(prompt)
    options = GenerationOptions.from_kwargs(
        max_new_tokens=max_new_tokens,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=[codecs_unescape(s) for s in (stop or [])],
        sampler=_sampler_changes(list(overrides or [])),
    )
    if not os.path.lexists(run / "gptkit.json"):  # a bundle, even a damaged one, says why
        require_torch("generate")
    gen = Inference.load(run, checkpoint=checkpoint)
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


def _sampler_changes(sets: list[str]) -> dict:
    """``--set sampler.x=y``: generation changes only the sampler (runs and bundles alike)."""
    from gptkit.spec import parse_override

    changes = {}
    for text in sets:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "sampler":
            raise GptkitError(f"--set {text!r}: generate takes sampler.FIELD=VALUE overrides only")
        changes[path[1]] = value
    return changes


def codecs_unescape(text: str) -> str:
    """'\\n' typed on a command line -> a newline (only simple escapes)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
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
    require_torch("eval")
    from gptkit.evaluate import evaluate_text, evaluate_tokens
    from gptkit.training.rundir import load_run

    loaded = load_run(run, checkpoint=checkpoint)
    if data is None:
        from gptkit.data import prepare_data

        spec = loaded.spec
        tokens = prepare_data(spec.data, spec.tokenizer).val
        result = evaluate_tokens(loaded.model, tokens, batch_size)
        result = {k: v for k, v in result.items() if k != "total_nats"}
        if as_json:
            echo(json.dumps({"split": "val", **result}))
            return
        echo(
            f"validation split of {spec.data.source}: {result['tokens']:,} tokens predicted "
            f"(every one, windows of {loaded.model.spec.max_seq_len})"
        )
        echo(f"  loss            {result['loss']:.4f} nats/token")
        echo(f"  perplexity      {result['perplexity']:.3f}")
        return
    result = evaluate_text(loaded.model, loaded.tokenizer, data, batch_size)
    if as_json:
        echo(json.dumps(result))
        return
    echo(f"{data}: {result['tokens']:,} tokens, {result['bytes']:,} bytes")
    echo(f"  loss            {result['loss']:.4f} nats/token")
    echo(f"  perplexity      {result['perplexity']:.3f}")
    echo(f"  bits per byte   {result['bits_per_byte']:.4f}")


# --------------------------------------------------------------------------- export, serve


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
    from gptkit.export import export_run

    export_run(
        run, out, quantize=quantize, checkpoint=checkpoint, register=register, tolerance=tolerance
    )


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="An export bundle folder.")],
    host: Annotated[
        str, typer.Option(help="Address to bind (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    max_concurrent: Annotated[
        int, typer.Option(min=1, help="Requests decoded together in the running batch.")
    ] = 16,
    max_queued: Annotated[int, typer.Option(min=0, help="Requests waiting beyond those.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens accepted.")] = 1024,
    body_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a client has to send its request body.")
    ] = 10.0,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a client has to send its request headers.")
    ] = 10.0,
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
    """Serve an export bundle over HTTP (OpenAI-style /v1/completions) on onnxruntime."""
    from gptkit.serve import Limits
    from gptkit.serve import serve as run_server

    run_server(
        str(bundle),
        host,
        port,
        Limits(
            max_concurrent=max_concurrent,
            max_queued=max_queued,
            max_tokens=max_tokens,
            body_timeout_s=body_timeout,
            header_timeout_s=header_timeout,
        ),
        name=served_model_name,
        access=access_log,
    )


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
    from gptkit.bench import format_report, run_bench
    from gptkit.spec import load_spec

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
            from gptkit.bench import inference_baseline

            report["inference_baseline"] = inference_baseline(
                new_tokens=gen_tokens, log=lambda m: echo(m, err=True)
            )
    if as_json:
        echo(json.dumps(report, indent=2))
        return
    echo(format_report(report))
    if "inference_baseline" in report:
        from gptkit.bench import format_inference

        echo(format_inference(report["inference_baseline"]))


@app.command("compare")
def compare_cmd(
    experiment: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="MLflow experiment (default: the most recently updated)."),
    ] = None,
    tracking_uri: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db."
        ),
    ] = None,
    plot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--plot", help="Where to write the curves (default compare-EXPERIMENT.png)."),
    ] = None,
    log: Annotated[
        bool,
        typer.Option(
            "--log",
            help="Also keep the comparison in MLflow (experiment "
            "EXPERIMENT-comparisons, apart from the runs).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Runs side by side from MLflow, best first: the spec fields that differ, final metrics,
    curves. Runs that differ only by seed are one row (mean ± std, n), and the best row is
    tested against the next (Welch's t-test). Adds nothing to the experiment."""
    from gptkit.training.compare import compare

    result = compare(experiment, tracking_uri, plot, log=log)
    if as_json:
        echo(json.dumps(result.to_json(), indent=2))
        return
    _print_table(result.grid)
    echo(result.verdict["text"])
    echo(f"validation curves: {result.plot}")


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

    run = import_hf(src, out, name)
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


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print a message and exit 2, never a traceback.

    Usage errors (bad flags) are handled by the CLI library itself, which also exits 2.
    """
    try:
        app(args=argv, prog_name="gptkit", standalone_mode=True)
    except GptkitError as exc:
        echo(f"gptkit: error: {exc}", err=True)
        sys.exit(exc.exit_code)
