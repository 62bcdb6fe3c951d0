"""Search: ``sweep: {method: random | tpe, trials: N, space: {...}}``, backed by Optuna.

Each trial is an MLflow child run of the search's parent (or, with ``repeats: R``, a group of
R seeds); the validation loss at each evaluation feeds Optuna's pruner, which stops hopeless
trials early (stop reason ``pruned``). The study lives in ``study.db`` (Optuna RDB storage) in
the search's folder, so an interrupted search continues like a sweep: ``gptkit train --resume
--run-dir FOLDER``; the trial that was stopped resumes from its checkpoint with its own values.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError, RunError
from gptkit.spec.models import ExperimentSpec
from gptkit.store.rundir import RunDir
from gptkit.training.sweep import (
    SWEEP_SPEC,
    SweepParent,
    SweepRun,
    _point,
    check_runs,
    opened_sweep_spec,
    point_name,
    run_overrides,
    start_sweep_folder,
)

NOT_GPTKITS_STUDY = "The search's study.db is not the one gptkit wrote: start the search again."
TRIAL_FOLDER = re.compile(r"trial-[0-9]{3,9}")  # a trial's folder, inside the search's


def optuna_module() -> Any:
    """Optuna, imported when a search runs (an optional extra)."""
    try:
        import optuna
    except ImportError:
        raise GptkitError(
            "sweep.method (a search) needs Optuna, which is not installed",
            "Install it: pip install 'gptkit[search]' (or use a grid: sweep: {field: [values]}).",
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def space_values(space: dict[str, Any]) -> list[list[str]]:
    """What ``validate`` checks of a space: every choice, and each range's two ends."""
    runs = []
    for key, dim in space.items():
        if isinstance(dim, list):
            values = dim
        else:
            values = [dim["low"], dim["high"]]
            values = [int(v) for v in values] if dim.get("int") else values
        runs += [[f"{key}={json.dumps(v)}"] for v in values]
    return runs


def check_search(
    raw: dict[str, Any], source: str, overrides: list[str], spec: ExperimentSpec
) -> dict[str, ExperimentSpec]:
    """Every choice and range end of the space validated (named by its space entry)."""
    return check_runs(raw, source, overrides, space_values(spec.sweep["space"]), "search space")


def describe(spec: ExperimentSpec) -> str:
    """``tpe search: 12 trials x 2 seeds`` (what validate says)."""
    s = spec.sweep
    seeds = f" x {spec.repeats} seeds" if spec.repeats > 1 else ""
    return f"{s['method']} search: {s['trials']} trials{seeds}, pruner {s.get('pruner', 'median')}"


def suggest(trial: Any, key: str, dim: Any) -> Any:
    if isinstance(dim, list):
        return trial.suggest_categorical(key, dim)
    log = bool(dim.get("log"))
    if dim.get("int"):
        return trial.suggest_int(key, int(dim["low"]), int(dim["high"]), log=log)
    return trial.suggest_float(key, float(dim["low"]), float(dim["high"]), log=log)


def run_search(
    raw: dict[str, Any],
    source: str,
    overrides: list[str],
    spec: ExperimentSpec,
    run_dir: Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Start a search in a new folder (``runs/<name>/sweep-<time>``)."""

    optuna_module()
    check_search(raw, source, overrides, spec)  # a bad choice fails before anything trains
    root, parent = start_sweep_folder(raw, spec, run_dir, list(overrides), command, "search")
    state = {
        "kind": "search",
        "source": source,
        "overrides": list(overrides),
        "parent_run_id": parent.run_id,
        "folders": {},
        "status": "running",
        "points": [],
        "groups": [],
    }
    return _run(root, state, raw, spec, parent, progress, command)


def resume_search(root: Path, state: dict[str, Any], progress: bool, command: str | None) -> list:
    """Continue a stopped search: the trial that was running resumes from its checkpoint."""
    from gptkit.spec.files import read_spec_file

    raw = read_spec_file(root / SWEEP_SPEC)
    spec = opened_sweep_spec(root, raw, state)
    parent = SweepParent.reopen(spec, state.get("parent_run_id"), root)
    print(f"resuming search {root}", flush=True)
    return _run(root, state, raw, spec, parent, progress, command)


def _open_study(root: Path, spec: ExperimentSpec) -> Any:
    optuna = optuna_module()
    s = spec.sweep
    sampler = (
        optuna.samplers.TPESampler(seed=spec.seed)
        if s["method"] == "tpe"
        else optuna.samplers.RandomSampler(seed=spec.seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if s.get("pruner", "median") == "median"
        else optuna.pruners.NopPruner()
    )
    try:
        study = optuna.create_study(
            study_name=spec.name,
            storage=f"sqlite:///{(root / 'study.db').resolve()}",
            sampler=sampler,
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    except Exception as exc:  # a damaged or foreign file: SQLAlchemy's and Optuna's errors
        raise RunError(
            f"{root / 'study.db'} cannot be opened as the search's study: "
            f"{type(exc).__name__}: {str(exc)[:200]}",
            NOT_GPTKITS_STUDY,
        ) from None
    running = optuna.trial.TrialState.RUNNING
    for stale in study.get_trials(deepcopy=False, states=(running,)):
        # Left by a stopped process: failed in the study, asked again with the same values
        # and folder, so its run resumes from its checkpoint.
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs=dict(stale.user_attrs))
    return study


def _run(
    root: Path,
    state: dict[str, Any],
    raw: dict[str, Any],
    spec: ExperimentSpec,
    parent: SweepParent,
    progress: bool,
    command: str | None,
) -> list[dict[str, Any]]:
    optuna = optuna_module()
    search = SweepRun(root, state, parent, "search", list(state.get("points") or []))
    study = _open_study(root, spec)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    try:
        failures = 0
        while len(study.get_trials(deepcopy=False, states=finished)) < spec.sweep["trials"]:
            search.check()
            if not _trial(search, raw, spec, study, progress, command):
                failures += 1
                if failures > spec.sweep["trials"]:
                    raise GptkitError("the search stopped: more failed trials than trials asked")
    except BaseException as exc:
        search.stop(exc)
    state["best"] = _best(study)
    return search.finish([r for r in search.results if r.get("stop_reason") != "pruned"])


def _best(study: Any) -> dict[str, Any] | None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    return {"trial": trial_number(best), "value": best.value, "params": best.params}


def _trial(
    search: SweepRun,
    raw: dict[str, Any],
    spec: ExperimentSpec,
    study: Any,
    progress: bool,
    command: str | None,
) -> bool:
    """Ask Optuna for a trial, train its seeds (the first one reports to the pruner), tell the
    result. False when its values make no valid spec (the trial is failed, the search goes on)."""
    from gptkit.training.tracking import time_ms

    optuna = optuna_module()
    root, state, parent = search.root, search.state, search.parent
    trial, params, folder = _ask(study, spec, state)
    point = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    seeds = [spec.seed + i for i in range(spec.repeats)]
    runs = [[*point, f"seed={s}"] for s in seeds] if spec.repeats > 1 else [point]
    try:
        specs = check_runs(raw, state["source"], state["overrides"], runs, "search trial")
    except GptkitError as exc:
        print(
            f"gptkit: warning: trial {trial_number(trial)} skipped: {exc.message}",
            file=sys.stderr,
        )
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    shown = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}"
        for k, v in params.items()
    ]
    label = f"trial {trial_number(trial)}: {point_name(shown)}"
    print(f"=== {label}", flush=True)
    group = parent.group(label, point, time_ms()) if len(runs) > 1 else None
    search.group = group
    search.save()
    done = []
    for i, run in enumerate(runs):
        name = f"{label} seed={seeds[i]}" if len(runs) > 1 else label
        where = (
            RunDir(root / folder / f"seed-{seeds[i]}") if len(runs) > 1 else RunDir(root / folder)
        )
        report = _reporter(trial) if i == 0 else None
        target = group.run_id if group else parent.run_id
        over = [*run_overrides(state["overrides"]), *run]
        result, stopped = _point(
            specs[point_name(run)], where, name, over, target, progress, command, report
        )
        entry = {**result, "group": label, "trial": trial_number(trial)}
        done.append(entry)
        _record(search, entry)
        if stopped:  # a signal as the run ended: it is kept, and the search stops here
            raise KeyboardInterrupt
        if result["stop_reason"] == "pruned":
            break
    if group is not None:
        group.finish(done, grouped=True)
        search.group = None
    _tell(study, trial, done)
    return True


def _record(search: SweepRun, entry: dict[str, Any]) -> None:
    """A run's entry in sweep.json: one kept from before (its trial asked again after the
    search stopped as the run ended) replaces the entry it had."""
    search.results[:] = [r for r in search.results if r["run_dir"] != entry["run_dir"]]
    search.results.append(entry)
    search.save()


def _ask(study: Any, spec: ExperimentSpec, state: dict[str, Any]) -> tuple[Any, dict, str]:
    """The next trial, its values, and its folder (a re-asked trial keeps its own)."""
    trial = study.ask()
    number = trial_number(trial)
    try:
        params = {key: suggest(trial, key, dim) for key, dim in spec.sweep["space"].items()}
    except ValueError as exc:  # a trial enqueued with values of another space
        raise RunError(
            f"study.db gives trial {number} values outside the search's space: {exc}",
            NOT_GPTKITS_STUDY,
        ) from None
    folder = trial.user_attrs.get("folder") or f"trial-{number:03d}"
    if not isinstance(folder, str) or not TRIAL_FOLDER.fullmatch(folder):
        raise RunError(
            f"study.db gives trial {number} the folder {str(folder)[:80]!r}; a trial's "
            "folder is trial-NNN inside the search's folder",
            NOT_GPTKITS_STUDY,
        )
    trial.set_user_attr("folder", folder)
    trial.set_user_attr("trial", number)
    state["folders"][str(number)] = folder
    return trial, params, folder


def trial_number(trial: Any) -> int:
    """The trial's number as the user sees it (labels, folders, sweep.json, MLflow): Optuna's,
    or for a trial asked again after an interruption (Optuna numbers it anew) its first one."""
    if "trial" in trial.user_attrs:
        number = trial.user_attrs["trial"]
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise RunError(
                f"study.db gives a trial the number {str(number)[:40]!r}, not a count",
                NOT_GPTKITS_STUDY,
            )
        return number
    folder = str(trial.user_attrs.get("folder", ""))  # asked again by an older gptkit
    return int(folder[6:]) if folder.startswith("trial-") and folder[6:].isdigit() else trial.number


def _tell(study: Any, trial: Any, done: list[dict[str, Any]]) -> None:
    """Pruned, or the mean final validation loss over the trial's seeds."""
    optuna = optuna_module()
    if done[-1]["stop_reason"] == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    finals = [r["val_loss"] for r in done if r["val_loss"] is not None]
    study.tell(trial, sum(finals) / len(finals) if finals else float("nan"))


def _reporter(trial: Any) -> Any:
    def report(step: int, val: float) -> bool:
        trial.report(val, step)
        return bool(trial.should_prune())

    return report
