"""Commands about training runs: ``train``, ``runs``, ``compare``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli._common import (
    STARTED,
    JsonOpt,
    SetOpt,
    app,
    echo,
    print_table,
    require_torch,
)
from gptkit.errors import GptkitError
from gptkit.safeio import escape_controls


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
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="With --resume: continue from latest, best or step-N (newer checkpoints are "
            "set aside in checkpoints/set-aside-TIME/, not deleted).",
        ),
    ] = "latest",
) -> None:
    """Validate SPEC, prepare data, train with progress, checkpoint, and track in MLflow."""
    require_torch("train")
    from gptkit.store.rundir import default_run_name
    from gptkit.training.distributed import close_process_group
    from gptkit.training.loop import SpecTrainer

    sets = list(overrides or [])
    if checkpoint != "latest" and not resume:
        raise GptkitError("--checkpoint goes with --resume (which checkpoint to continue from)")
    if resume and _resumed_sweep(spec, run_dir, sets, not no_progress):
        return
    if resume:
        resolved, run_dir = _resumption(spec, run_dir, sets)
    else:
        resolved = _new_spec(spec, sets, run_dir, not no_progress)
        if resolved is None:
            return  # a sweep, trained
    trainer = SpecTrainer(
        resolved,
        run_dir=run_dir,
        resume=resume,
        progress=not no_progress,
        run_name=name or (None if resume else default_run_name(resolved.name, sets)),
        overrides=sets,
        command=_command_line(),
        started_at=STARTED,
        checkpoint=checkpoint,
    )
    result = trainer.run()
    bundle = trainer.rundir.default_bundle
    del trainer  # with its DDP/FSDP wrapper, before the process group closes
    close_process_group()
    if not _first_process():
        return  # under torchrun, rank 0 reports
    if resolved.export.onnx:  # export: {onnx: true} in the spec: a bundle inside the run
        from gptkit.export.bundle import export_run

        export_run(result.run_dir, bundle, quantize=resolved.export.quantize)
    echo(_train_report(result))


def _first_process() -> bool:
    """Whether this is torchrun's rank 0 (or no torchrun): the one that speaks."""
    return os.environ.get("RANK", "0") == "0"


def _resumption(spec: Path | None, run_dir: Path | None, sets: list[str]):
    from gptkit.training.resume import resume_spec

    resumption = resume_spec(spec, run_dir, sets)
    if _first_process():  # under torchrun: once, not once per process
        for note in resumption.notes:
            echo(f"gptkit: {note}", err=True)
    return resumption.spec, resumption.run_dir


def _new_spec(spec: Path | None, sets: list[str], run_dir: Path | None, progress: bool):
    """The spec of a new run; a sweep (or repeats) is trained here and None returned."""
    if spec is None:
        raise GptkitError("gptkit train needs a SPEC file (or --resume --run-dir RUN)")
    from gptkit.spec.files import compose_spec_file, validate_composed

    composed = compose_spec_file(spec)  # with the files it extends merged in
    resolved = validate_composed(composed, str(spec), sets)
    if resolved.sweep or resolved.repeats > 1:
        _train_sweep(composed.data, spec, sets, resolved, run_dir, progress)
        return None
    from gptkit.spec.validate import spec_warnings

    for warning in spec_warnings([resolved]):
        echo(f"gptkit: warning: {warning}", err=True)
    return resolved


def _command_line() -> str:
    import shlex

    return "gptkit " + shlex.join(sys.argv[1:])


def _train_sweep(raw, spec: Path, sets: list[str], resolved, run_dir, progress: bool) -> None:
    from gptkit.training.search import run_search
    from gptkit.training.sweep import is_search, run_sweep

    runner = run_search if is_search(resolved.sweep) else run_sweep
    results = runner(
        raw, str(spec), sets, resolved, run_dir, progress=progress, command=_command_line()
    )
    _report_sweep(results)


def _resumed_sweep(spec: Path | None, run_dir: Path | None, sets, progress: bool) -> bool:
    """Continue a sweep if that is what ``--resume`` names; False when it names one run."""
    sweep_dir = _sweep_to_resume(spec, run_dir)
    if sweep_dir is None:
        return False
    if sets:
        raise GptkitError(
            "--set cannot change a sweep being continued (its runs must stay comparable)",
            "Continue it as it was: gptkit train --resume --run-dir " + str(sweep_dir),
        )
    from gptkit.training.sweep import read_sweep_state, resume_sweep

    state = read_sweep_state(sweep_dir)
    if state.get("kind") == "search" and state.get("status") != "finished":
        from gptkit.training.search import resume_search

        _report_sweep(resume_search(sweep_dir, state, progress, _command_line()))
        return True
    _report_sweep(resume_sweep(sweep_dir, progress, _command_line()))
    return True


def _sweep_to_resume(spec: Path | None, run_dir: Path | None) -> Path | None:
    """The sweep folder a ``--resume`` continues: ``--run-dir`` when it is one, else (a sweep
    spec and no ``--run-dir``) the newest sweep of that spec."""
    from gptkit.training.sweep import is_sweep_folder, newest_sweep

    if run_dir is not None:
        return run_dir if is_sweep_folder(run_dir) else None
    if spec is None:
        return None
    from gptkit.spec.files import load_spec

    resolved = load_spec(spec)
    if not (resolved.sweep or resolved.repeats > 1):
        return None
    found = newest_sweep(resolved.name)
    if found is None:
        raise GptkitError(
            f"nothing to resume: no sweep of '{resolved.name}' under runs/{resolved.name}/",
            f"Start it without --resume: gptkit train {spec}",
        )
    return found


def _report_sweep(results) -> None:
    echo("sweep done:")
    for r in results:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        note = " (pruned)" if r.get("stop_reason") == "pruned" else ""
        echo(f"  {r['point']:<40} val loss {val}{note}  {r['run_dir']}")


def _train_report(result) -> str:
    if result.steps_trained == 0 and result.stop_reason == "early_stop":
        return (
            f"nothing to train: the run stopped early at step {result.step} (train.early_stop: "
            "its validation loss stopped improving); go on with --set train.early_stop=null "
            f"or a larger patience\nrun: {result.run_dir}"
        )
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
        f"{result.elapsed:.1f}s{_time_shares(result)}, val loss {val}, "
        f"{result.tokens_per_sec:,.0f} tokens/s\nrun: {result.run_dir}"
    )


def _time_shares(result) -> str:
    """Where the session's time went, when anything besides the training steps took a
    visible part of it: " (steps 20.1s, evaluation 3.0s, samples 1.2s, checkpoints 0.4s)"."""
    other = {k: v for k, v in result.phases.items() if v >= 0.05}
    if not other:
        return ""
    steps = max(0.0, result.elapsed - sum(result.phases.values()))
    # "tracking" closes the run's record: with MLflow off, the plot and run.json only
    names = {} if result.tracked else {"tracking": "record"}
    parts = [f"steps {steps:.1f}s"] + [f"{names.get(k, k)} {v:.1f}s" for k, v in other.items()]
    return f" ({', '.join(parts)})"


@app.command("runs")
def runs_cmd(
    experiment: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(
            metavar="SPEC_NAME",
            help="Only the runs of this spec name (a folder under runs/; not an MLflow "
            "experiment, which several specs may share).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs newest first: name, status, steps, best/final val loss, tokens/s, wall time."""
    from gptkit.store.rundir import RUNS_ROOT
    from gptkit.training.listing import format_rows, list_runs

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
    print_table(format_rows(rows))


@app.command("compare")
def compare_cmd(
    targets: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            help="What to compare, any number and mixed: MLflow experiments, spec files, run "
            "folders (a run, a sweep, runs/NAME) or spec names (default: the most recently "
            "updated experiment)."
        ),
    ] = None,
    experiments: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--experiment", help="Experiments to compare, comma-separated: a,b."),
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

    chosen = [*(targets or []), *(e.strip() for e in (experiments or "").split(",") if e.strip())]
    result = compare(chosen, tracking_uri, plot, log=log)
    if as_json:
        echo(json.dumps(result.to_json(), indent=2))
        return
    print_table(result.grid)
    for caveat in result.caveats:
        echo(f"gptkit: warning: {escape_controls(caveat)}", err=True)
    echo(escape_controls(result.verdict["text"]))
    echo(f"validation curves: {result.plot}")
