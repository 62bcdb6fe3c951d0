"""Sweeps: a grid over spec fields, trained one point after another, as child MLflow runs of
one parent run that spans them and carries the best child's figures."""

from __future__ import annotations

import itertools
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from gptkit.errors import GptkitError, RunError, SpecError
from gptkit.safeio import read_json
from gptkit.spec.models import ExperimentSpec
from gptkit.spec.validate import parse_override, validate_spec
from gptkit.store.rundir import MAX_RUN_FILE, RunDir, default_run_name, short_override

MAX_POINTS = 1000
SWEEP_SPEC = "sweep-spec.yaml"  # the composed spec a sweep runs (kept for its resume)


def sweep_points(sweep: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid, as ``--set`` style overrides."""
    keys = list(sweep)
    for key in keys:
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise GptkitError(f"sweep.{key}: give a list of at least one value")
    size = math.prod(len(sweep[k]) for k in keys)
    if size > MAX_POINTS:  # counted before anything is built
        raise GptkitError(
            f"sweep: the grid has {size:,} points; at most {MAX_POINTS} are run",
            "Sweep fewer values, or split the grid into several specs.",
        )
    return [
        [f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)]
        for combo in itertools.product(*(sweep[k] for k in keys))
    ]


def point_name(overrides: list[str]) -> str:
    """A grid point's short, readable name: ``positional=rope lr=0.003``."""
    return " ".join(short_override(o) for o in overrides)


Plan = list[tuple[list[str], list[list[str]]]]


def sweep_plan(spec: ExperimentSpec) -> Plan:
    """The grid as (point, the overrides of each of its runs): one run per point, or one per
    seed when the grid has a ``seed`` axis or ``repeats`` > 1 (seeds ``seed``, ``seed+1``, ...)."""
    grid = dict(spec.sweep)
    seeds = grid.pop("seed", None)
    if seeds is not None and spec.repeats > 1:
        raise GptkitError(
            "the spec has both sweep.seed and repeats; give the seeds one way",
            "Keep sweep: {seed: [...]} or repeats: N, not both.",
        )
    if spec.repeats > 1:
        seeds = [spec.seed + i for i in range(spec.repeats)]
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise GptkitError("sweep.seed: give a list of at least one value")
    size = len(seeds or [0]) * math.prod(
        len(v) if isinstance(v, list) else 1 for v in grid.values()
    )
    if size > MAX_POINTS:  # counted, seeds included, before anything is built
        raise GptkitError(
            f"sweep: the grid has {size:,} points (seeds included); at most {MAX_POINTS} are run",
            "Sweep fewer values, or split the grid into several specs.",
        )
    points = sweep_points(grid)
    if seeds is None:
        return [(p, [p]) for p in points]
    return [(p, [[*p, f"seed={json.dumps(s)}"] for s in seeds]) for p in points]


def run_sweep(
    raw: dict[str, Any],
    source: str,
    overrides: list[str],
    spec: ExperimentSpec,
    run_dir: Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Validate every run first, then train them in order. Returns one summary per run; runs
    that differ only by seed share a ``group`` (an MLflow parent run of their own).

    The sweep's folder keeps what it needs to be continued (``sweep-spec.yaml`` and
    ``sweep.json``): ``resume_sweep`` goes on from where it stopped."""

    plan, specs = check_sweep(raw, source, overrides, spec)  # a bad point fails first
    from gptkit.spec.validate import spec_warnings

    for warning in spec_warnings(specs.values()):
        print(f"gptkit: warning: {warning}", file=sys.stderr)
    root, parent = start_sweep_folder(raw, spec, run_dir, overrides, command, "sweep")
    state = {
        "source": source,
        "overrides": list(overrides),
        "parent_run_id": parent.run_id,
        "group_run_ids": {},
        "status": "running",
        "points": [],
        "groups": [],
    }
    return _run_plan(root, state, spec, specs, plan, parent, progress, command)


def resume_sweep(root: Path, progress: bool = True, command: str | None = None) -> list[dict]:
    """Continue a sweep where it stopped: finished points are kept, the interrupted one
    resumes from its checkpoint, the rest run. The same MLflow parent (and groups) go on."""
    from gptkit.spec.files import read_spec_file

    state = read_sweep_state(root)
    if state.get("status") == "finished":  # nothing to do, and nothing in MLflow changes
        print(f"the sweep in {root} has finished; nothing to train", flush=True)
        return list(state.get("points") or [])
    raw = read_spec_file(root / SWEEP_SPEC)
    source, overrides = state["source"], state["overrides"]
    spec = opened_sweep_spec(root, raw, state)
    plan, specs = check_sweep(raw, source, overrides, spec)
    parent = SweepParent.reopen(spec, state.get("parent_run_id"), root)
    print(f"resuming sweep {root}", flush=True)
    return _run_plan(root, state, spec, specs, plan, parent, progress, command)


def start_sweep_folder(
    raw: dict[str, Any],
    spec: ExperimentSpec,
    run_dir: Path | None,
    overrides: list[str],
    command: str | None,
    what: str,
) -> tuple[Path, SweepParent]:
    """A new sweep's or search's folder (its composed spec kept for a resume) and its MLflow
    parent run."""
    from gptkit.store.rundir import dump_yaml
    from gptkit.training.tracking import time_ms

    root = Path(run_dir or RunDir.new_sweep(spec.name))
    root.mkdir(parents=True, exist_ok=True)
    dump_yaml(raw, root / SWEEP_SPEC)
    name = f"{default_run_name(spec.name, overrides)} {what}"
    return root, SweepParent.start(spec, name, time_ms(), root, command, list(overrides))


def opened_sweep_spec(root: Path, raw: dict[str, Any], state: dict[str, Any]) -> ExperimentSpec:
    """The spec of a sweep folder being continued, read as any run's: its ``plugins:`` (and
    any its recorded overrides add) are imported only if installed or allowed by the user."""
    return validate_spec(raw, str(root / SWEEP_SPEC), state["overrides"], opened=True)


def read_sweep_state(root: Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.json`` (made by this version: it names its spec and overrides)."""
    try:
        state = read_json(RunDir.sweep_file(root), "sweep.json", MAX_RUN_FILE, RunError)
    except RunError as exc:
        raise RunError(f"{root} is not a sweep folder (no readable sweep.json: {exc})") from None
    if not isinstance(state, dict) or not (root / SWEEP_SPEC).is_file() or "source" not in state:
        raise RunError(
            f"cannot resume the sweep in {root}: it has no {SWEEP_SPEC} (made by an older "
            "gptkit, or damaged)",
            "Start the sweep again: gptkit train SPEC",
        )
    overrides = state.get("overrides", [])
    if not isinstance(state["source"], str) or not (
        isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)
    ):
        raise RunError(
            f"cannot resume the sweep in {root}: its sweep.json is damaged (source must be a "
            "path, overrides a list of PATH=VALUE strings)",
            "Start the sweep again: gptkit train SPEC",
        )
    return {**state, "overrides": overrides}


def is_sweep_folder(path: Path) -> bool:
    # exists(), not is_file(): a sweep.json that is a FIFO or a folder is a damaged sweep,
    # which read_sweep_state names, not "not a run".
    return RunDir.sweep_file(path).exists() and (path / SWEEP_SPEC).is_file()


def newest_sweep(spec_name: str) -> Path | None:
    """The newest sweep folder of a spec (``runs/<name>/sweep-<time>``), if any."""
    from gptkit.store.rundir import RUNS_ROOT

    folders = sorted((RUNS_ROOT / spec_name).glob("sweep-*"))
    found = [f for f in folders if is_sweep_folder(f)]
    return found[-1] if found else None


def check_sweep(
    raw: dict[str, Any], source: str, overrides: list[str], spec: ExperimentSpec
) -> tuple[Plan, dict[str, ExperimentSpec]]:
    """The sweep's plan and every run's validated spec (``gptkit validate`` and ``train`` both
    check each point before anything trains). A bad value is blamed on its sweep entry."""
    try:
        plan = sweep_plan(spec)
    except GptkitError as exc:  # named with its file, as the spec's other problems are
        raise GptkitError(f"{source}: {exc.message}", exc.hint) from None
    runs = [run for _, point_runs in plan for run in point_runs]
    return plan, check_runs(raw, source, overrides, runs, "sweep entry")


def run_overrides(overrides: list[str]) -> list[str]:
    """The sweep's ``--set`` overrides that each of its runs takes: not those that shaped the
    sweep itself (``--set sweep.trials=3``, ``--set repeats=2``), which a run has none of."""
    return [o for o in overrides if parse_override(o)[0][0] not in ("sweep", "repeats")]


def check_runs(
    raw: dict[str, Any], source: str, overrides: list[str], runs: list[list[str]], entry: str
) -> dict[str, ExperimentSpec]:
    """Each run's spec (the spec without its sweep, with the run's overrides), by run name;
    every distinct problem over all runs in one error, each named by its ``entry``."""
    base = {k: v for k, v in raw.items() if k not in ("sweep", "repeats")}
    overrides = run_overrides(overrides)
    specs, problems = {}, {}
    for run in runs:
        labels = {o: f"{entry} {o} in {source}" for o in run}
        try:
            specs[point_name(run)] = validate_spec(
                base, f"{source} (sweep point {point_name(run)})", [*overrides, *run], labels=labels
            )
        except SpecError as exc:  # every distinct problem, not only the first run's
            for where, message in exc.problems:
                # Once per problem, named by its first entry: an unknown key is the same
                # problem for each of its values (a bad value names itself in the message).
                problem = message.split(f" (from {entry} ")[0]
                problems.setdefault(f"{where}: {problem}", (where, message))
        except GptkitError as exc:
            problems.setdefault(exc.message, ("sweep", exc.message))
    if problems:
        raise SpecError(f"{source} (sweep:)", list(problems.values()))
    return specs


def _run_plan(
    root: Path,
    state: dict[str, Any],
    spec: ExperimentSpec,
    specs: dict[str, ExperimentSpec],
    plan: Plan,
    parent: SweepParent,
    progress: bool,
    command: str | None,
) -> list[dict[str, Any]]:
    """Train every run of the plan not finished yet; keep ``sweep.json`` and the MLflow
    parent true whatever happens (KILLED on Ctrl-C or a signal, FAILED on an error)."""
    sweep = SweepRun(root, state, parent, "sweep", [])
    try:
        index, total = 0, sum(len(runs) for _, runs in plan)
        for point, runs in plan:
            group_name = point_name(point) or spec.name
            group = _open_group(parent, state, group_name, point) if len(runs) > 1 else None
            sweep.group = group
            sweep.save()  # the group's MLflow id, before anything can stop it
            done = []
            for run in runs:
                sweep.check()
                index += 1
                name = point_name(run)
                print(f"=== sweep point {index}/{total}: {name}", flush=True)
                folder = RunDir.sweep_point(root, index, name)
                target = group.run_id if group else parent.run_id
                over = [*run_overrides(state["overrides"]), *run]
                result, stopped = _point(specs[name], folder, name, over, target, progress, command)
                done.append({**result, "group": group_name})
                sweep.results.append(done[-1])
                sweep.save()
                if stopped:  # a signal as the run ended: it is kept, and the sweep stops here
                    raise KeyboardInterrupt
            if group is not None:
                group.finish(done, grouped=True)
                state["groups_done"].append(group.done_key)
                sweep.group = None
    except BaseException as exc:
        sweep.stop(exc)
    return sweep.finish(sweep.results)


class SweepRun:
    """A sweep (or search) being run: its lock, its watcher, ``sweep.json`` and the MLflow
    runs left open, ended truly however it stops."""

    def __init__(
        self,
        root: Path,
        state: dict[str, Any],
        parent: SweepParent,
        what: str,
        results: list[dict[str, Any]],
    ) -> None:
        self.root, self.state, self.parent, self.what = root, state, parent, what
        self.results = results
        self.group: SweepParent | None = None  # a group run open now
        self.hint = f"gptkit train --resume --run-dir {root}"
        RunDir(root).lock()  # one process runs a sweep at a time
        self.watch = start_watch(root, parent) if parent.run_id else None
        state.update(status="running", resume=self.hint)
        self.save()
        self.signalled = False
        self._previous = self._install_signal()

    def _install_signal(self) -> dict[int, Any]:
        """Ctrl-C between runs: KeyboardInterrupt as ever, and remembered. Python drops one
        raised inside a weakref callback or ``__del__`` ("Exception ignored"), which left the
        sweep going on to its end; :meth:`check` stops it before the next run then. (A run's
        trainer puts its own handler over this one while it trains.)"""

        def handler(signum: int, frame: Any) -> None:
            self.signalled = True
            raise KeyboardInterrupt

        try:
            return {signal.SIGINT: signal.signal(signal.SIGINT, handler)}
        except ValueError:  # not in the main thread
            return {}

    def check(self) -> None:
        """Before each run: stop here if an interruption came and was lost."""
        if self.signalled:
            raise KeyboardInterrupt

    def save(self) -> None:
        _save_state(self.root, self.state, self.results)

    def _close(self, status: str) -> None:
        self.state["status"] = status
        self.save()
        _stop_watch(self.watch)
        RunDir(self.root).unlock()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def stop(self, exc: BaseException) -> NoReturn:
        """Stopped by ``exc``: the open runs KILLED (interrupted) or FAILED, then re-raised
        with the command that continues."""
        status = "KILLED" if _is_interruption(exc) else "FAILED"
        for run in (self.group, self.parent):
            if run is not None:
                run.end(status)
        self._close(status.lower())
        if status == "KILLED":
            from gptkit.training.loop import Interrupted

            raise Interrupted(
                f"{self.what} interrupted after {len(self.results)} finished run(s); its "
                f"folder: {self.root}",
                f"Continue the {self.what} with: {self.hint}",
            ) from None
        print(
            f"gptkit: the {self.what} stopped; once fixed, continue it with: {self.hint}",
            file=sys.stderr,
        )
        raise exc

    def finish(self, ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Done: ``sweep.json`` says finished, the parent gets the best of ``ranked``."""
        self._close("finished")
        self.parent.finish(ranked)
        return self.results


def _is_interruption(exc: BaseException) -> bool:
    from gptkit.training.loop import Interrupted

    return isinstance(exc, (KeyboardInterrupt, Interrupted))


def _save_state(root: Path, state: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """``sweep.json``, written whole after every run (atomically: a kill never leaves half)."""
    from gptkit.store.rundir import atomic_write_text

    state.update(points=results, groups=group_summaries(results))
    atomic_write_text(RunDir.sweep_file(root), json.dumps(state, indent=2))


def _open_group(
    parent: SweepParent, state: dict[str, Any], name: str, point: list[str]
) -> SweepParent | None:
    """The MLflow group of one point's seeds: the one made before this sweep was stopped, or
    a new one. None for a group already finished (nothing of it runs again)."""
    from gptkit.training.tracking import time_ms

    if name in state.setdefault("groups_done", []):
        return None
    known = state.setdefault("group_run_ids", {}).get(name)
    group = parent.reopen_child(known) if known else parent.group(name, point, time_ms())
    if group.run_id:
        state["group_run_ids"][name] = group.run_id
    group.done_key = name
    return group


def is_search(sweep: dict[str, Any]) -> bool:
    """``sweep: {method: ...}`` is a search (gptkit.training.search), not a grid."""
    return "method" in sweep


def _point(
    spec: ExperimentSpec,
    folder: RunDir,
    name: str,
    overrides: list[str],
    parent_run_id: str | None,
    progress: bool,
    command: str | None,
    on_eval: Any = None,
) -> tuple[dict[str, Any], bool]:
    """One run of the sweep: kept if it finished before, resumed from its checkpoint if it was
    stopped, else trained from the start. ``on_eval``: a search's pruner (see SpecTrainer).
    Its result, and whether a signal came as the run was ending (after its last check): the
    run is finished and kept, and the sweep stops after recording it."""
    from gptkit.store.checkpoint import resume_candidates
    from gptkit.training.loop import SpecTrainer

    if folder.is_run() and folder.info().get("status") == "FINISHED":
        print(f"    finished before, kept: {folder.path}", flush=True)
        return _point_result(spec, folder, name), False
    resume = folder.is_run() and bool(resume_candidates(folder.checkpoints))
    if not resume and folder.path.exists():
        _discard(folder)
    trainer = SpecTrainer(
        spec,
        run_dir=folder.path,
        resume=resume,
        progress=progress,
        parent_run_id=parent_run_id,
        run_name=name,
        overrides=overrides,
        command=command,
        on_eval=on_eval,
    )
    trainer.run()
    return _point_result(spec, folder, name), trainer.stop_signal is not None


def _discard(folder: RunDir) -> None:
    """A run stopped before its first checkpoint: nothing to resume, so it starts again (its
    MLflow run, which holds only the first steps, is deleted so the sweep keeps one per point)."""
    import shutil

    from gptkit.training.tracking import read_mlflow_link

    if folder.writer_pid() is not None:
        raise RunError(f"{folder.path} is being written by another process ({folder.writer_pid()})")
    link = read_mlflow_link(folder)
    if link:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(link["uri"]).delete_run(link["run_id"])
        except Exception as exc:
            print(
                f"gptkit: warning: MLflow run {link['run_id']} not deleted: {exc}", file=sys.stderr
            )
    print(f"    stopped before its first checkpoint; starting it again: {folder.path}", flush=True)
    shutil.rmtree(folder.path)


def _point_result(spec: ExperimentSpec, folder: RunDir, name: str) -> dict[str, Any]:
    summary = folder.info().get("summary") or {}
    return {
        "point": name,
        "run_dir": str(folder.path),
        "seed": spec.seed,
        "val_loss": summary.get("final_val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
        "tokens_per_sec": summary.get("tokens_per_sec"),
        "stop_reason": summary.get("stop_reason"),
    }


def start_watch(root: Path, parent: SweepParent) -> Any:
    """A small process that outlives a ``kill -9`` of this one: it marks the sweep's MLflow
    runs KILLED (with an end time) the moment this process is gone without ending them."""
    import os
    import subprocess

    if os.name != "posix" or parent.uri is None:
        return None
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gptkit.training.sweep_watch",
                str(os.getpid()),
                parent.uri,
                str(parent.run_id),
                str(root),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal does not reach it
        )
    except OSError as exc:
        print(f"gptkit: warning: no watcher for the sweep's MLflow runs: {exc}", file=sys.stderr)
        return None


def _stop_watch(watch: Any) -> None:
    if watch is not None:
        watch.terminate()
        watch.wait(timeout=10)


def group_summaries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group of seeds: n, and mean and standard deviation of final and best val loss."""
    out = []
    for name in dict.fromkeys(r["group"] for r in results if "group" in r):
        members = [r for r in results if r.get("group") == name]
        out.append({"group": name, **group_metrics(members)})
    return out


def group_metrics(members: list[dict[str, Any]]) -> dict[str, float]:
    """``val_loss_mean``, ``val_loss_std``, ``best_val_loss_mean``, ... and ``n`` (the runs
    that reached an evaluation)."""
    from gptkit.training.stats import mean_std

    out: dict[str, float] = {}
    for key in ("val_loss", "best_val_loss"):
        values = [r[key] for r in members if r.get(key) is not None]
        if values:
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(values)
            out["n"] = float(len(values))
    return out


def _parent_tags(
    spec: ExperimentSpec, root: Path | None, command: str | None, overrides: list[str] | None
) -> dict[str, str]:
    """What a sweep's or search's parent run says of itself, as a run's record does."""
    from gptkit.training.record import description_tags

    where = f"sweep folder: {root.resolve()}" if root is not None else ""
    return description_tags(command, where, spec.name, overrides)


class SweepParent:
    """The MLflow run the points nest under (never fatal: tracking never stops training).

    With seeds, each grid point has a parent of its own (``gptkit.kind=group``, nested under
    the sweep's) whose metrics are the mean and standard deviation over its seeds."""

    def __init__(
        self, client: Any, run_id: str | None, uri: str | None = None, root: Path | None = None
    ) -> None:
        self.client, self.run_id, self.uri, self.root = client, run_id, uri, root
        self.done_key = ""

    @classmethod
    def start(
        cls,
        spec: ExperimentSpec,
        name: str,
        start_time: int,
        root: Path | None = None,
        command: str | None = None,
        overrides: list[str] | None = None,
    ) -> SweepParent:
        if not spec.tracking.enabled:
            return cls(None, None)
        from gptkit.training.tracking import ensure_experiment

        try:
            client, uri = cls._client(spec)
            exp_id = ensure_experiment(client, spec.tracking.experiment or spec.name)
            tags = {"gptkit.kind": "sweep", **_parent_tags(spec, root, command, overrides)}
            run = client.create_run(exp_id, start_time=start_time, run_name=name, tags=tags)
            client.log_param(run.info.run_id, "sweep", json.dumps(spec.sweep)[:6000])
            if spec.repeats > 1:
                client.log_param(run.info.run_id, "repeats", str(spec.repeats))
            if root is not None:  # the composed spec, as a run's spec.yaml is attached
                client.log_artifact(run.info.run_id, str(root / SWEEP_SPEC))
            return cls(client, run.info.run_id, uri, root)
        except Exception as exc:
            print(f"gptkit: warning: no MLflow parent run for the sweep: {exc}", file=sys.stderr)
            return cls(None, None)

    @staticmethod
    def _client(spec: ExperimentSpec) -> tuple[Any, str]:
        from mlflow.tracking import MlflowClient

        from gptkit.training.tracking import quick_timeouts, resolve_uri

        quick_timeouts()
        uri = resolve_uri(spec.tracking.uri)
        return MlflowClient(uri), uri

    @classmethod
    def reopen(
        cls, spec: ExperimentSpec, run_id: str | None, root: Path | None = None
    ) -> SweepParent:
        """The parent of a sweep being continued (in ``root``), marked RUNNING again."""
        if not spec.tracking.enabled or not run_id:
            return cls(None, None)
        try:
            client, uri = cls._client(spec)
            parent = cls(client, None, uri).reopen_child(run_id)
            parent.root = root if parent.client is not None else None
            return parent
        except Exception as exc:
            print(
                f"gptkit: warning: MLflow sweep run {run_id} not reopened: {exc}", file=sys.stderr
            )
            return cls(None, None)

    def reopen_child(self, run_id: str) -> SweepParent:
        """Another run of this store (a group, or the parent itself) marked RUNNING again."""
        if self.client is None:
            return SweepParent(None, None)
        try:
            self.client.update_run(run_id, status="RUNNING")
            return SweepParent(self.client, run_id, self.uri)
        except Exception as exc:
            print(f"gptkit: warning: MLflow run {run_id} not reopened: {exc}", file=sys.stderr)
            return SweepParent(None, None)

    def group(self, name: str, point: list[str], start_time: int) -> SweepParent:
        """A parent run for one grid point's seeds, nested under this one (with the point's
        fields as params, so the MLflow UI can compare groups)."""
        if self.client is None:
            return SweepParent(None, None)
        try:
            exp_id = self.client.get_run(self.run_id).info.experiment_id
            run = self.client.create_run(
                exp_id,
                start_time=start_time,
                run_name=name,
                tags={"gptkit.kind": "group", "mlflow.parentRunId": self.run_id},
            )
            for override in point:
                key, _, value = override.partition("=")
                self.client.log_param(run.info.run_id, key, value.strip('"'))
            return SweepParent(self.client, run.info.run_id, self.uri)
        except Exception as exc:
            print(f"gptkit: warning: no MLflow group run for {name}: {exc}", file=sys.stderr)
            return SweepParent(None, None)

    def end(self, status: str) -> None:
        """Stopped (KILLED or FAILED), with the time it stopped."""
        if self.client is None:
            return
        from gptkit.training.tracking import time_ms

        try:
            self.client.set_terminated(self.run_id, status=status, end_time=time_ms())
        except Exception as exc:
            print(f"gptkit: warning: sweep run not marked {status}: {exc}", file=sys.stderr)

    def finish(self, results: list[dict[str, Any]], grouped: bool = False) -> None:
        """A sweep: the best point's figures (the best group's means when seeds repeat); a
        group: mean and std over its seeds. Either way an end time after the last child."""
        if self.client is None:
            return
        from gptkit.training.tracking import time_ms

        try:
            metrics = group_metrics(results) if grouped else self._best(results)
            for key, value in metrics.items():
                if value is not None:
                    self.client.log_metric(self.run_id, key, float(value))
            if self.root is not None and RunDir.sweep_file(self.root).is_file():
                self.client.log_artifact(self.run_id, str(RunDir.sweep_file(self.root)))
            self.client.set_terminated(self.run_id, end_time=time_ms())
        except Exception as exc:
            print(f"gptkit: warning: sweep parent run not updated: {exc}", file=sys.stderr)

    def _best(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        done = [r for r in results if r["best_val_loss"] is not None]
        if not done:
            return {}
        best = min(done, key=lambda r: r["best_val_loss"])
        self.client.set_tag(self.run_id, "gptkit.best_point", best["point"])
        groups = [g for g in group_summaries(results) if "val_loss_mean" in g and g.get("n", 0) > 1]
        if groups:  # seeds repeat: the best configuration is the best mean, not a lucky seed
            top = min(groups, key=lambda g: g["val_loss_mean"])
            self.client.set_tag(self.run_id, "gptkit.best_group", top["group"])
            return {
                **{k: v for k, v in top.items() if k != "group"},
                "val_loss": top["val_loss_mean"],
                "best_val_loss": top.get("best_val_loss_mean"),
            }
        return {
            "best_val_loss": best["best_val_loss"],
            "val_loss": best["val_loss"],
            "tokens_per_sec": best["tokens_per_sec"],
        }
