"""Sweeps: a grid over spec fields, trained one point after another, as child MLflow runs of
one parent run that spans them and carries the best child's figures."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.spec.models import ExperimentSpec
from gptkit.spec.validate import validate_spec
from gptkit.store.rundir import RunDir, default_run_name, short_override

MAX_POINTS = 1000


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


def sweep_plan(spec: ExperimentSpec) -> list[tuple[list[str], list[list[str]]]]:
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
    that differ only by seed share a ``group`` (an MLflow parent run of their own)."""
    from gptkit.training.tracking import time_ms

    base = {k: v for k, v in raw.items() if k not in ("sweep", "repeats")}
    plan = sweep_plan(spec)
    specs = {
        point_name(r): validate_spec(
            base, f"{source} (sweep point {point_name(r)})", [*overrides, *r]
        )
        for _, runs in plan
        for r in runs
    }  # a bad point fails before anything trains
    root = run_dir or RunDir.new_sweep(spec.name)
    parent = SweepParent.start(spec, default_run_name(spec.name, overrides) + " sweep", time_ms())
    results: list[dict[str, Any]] = []
    total = sum(len(runs) for _, runs in plan)
    for point, runs in plan:
        group_name = point_name(point) or spec.name
        group = parent.group(group_name, point, time_ms()) if len(runs) > 1 else None
        done = []
        for run in runs:
            name = point_name(run)
            print(f"=== sweep point {len(results) + 1}/{total}: {name}", flush=True)
            folder = RunDir.sweep_point(root, len(results) + 1, name)
            result = _train_point(
                specs[name],
                folder,
                name,
                [*overrides, *run],
                group.run_id if group else parent.run_id,
                progress,
                command,
            )
            entry = {**result, "group": group_name}
            done.append(entry)
            results.append(entry)
        if group is not None:
            group.finish(done, grouped=True)
    RunDir.sweep_file(root).write_text(
        json.dumps(
            {"parent_run_id": parent.run_id, "points": results, "groups": group_summaries(results)},
            indent=2,
        )
    )
    parent.finish(results)
    return results


def _train_point(
    spec: ExperimentSpec,
    run: RunDir,
    name: str,
    overrides: list[str],
    parent_run_id: str | None,
    progress: bool,
    command: str | None,
) -> dict[str, Any]:
    from gptkit.training.loop import SpecTrainer

    result = SpecTrainer(
        spec,
        run_dir=run.path,
        progress=progress,
        parent_run_id=parent_run_id,
        run_name=name,
        overrides=overrides,
        command=command,
    ).run()
    return {
        "point": name,
        "run_dir": str(run.path),
        "seed": spec.seed,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "tokens_per_sec": result.tokens_per_sec,
        "stop_reason": result.stop_reason,
    }


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


class SweepParent:
    """The MLflow run the points nest under (never fatal: tracking never stops training).

    With seeds, each grid point has a parent of its own (``gptkit.kind=group``, nested under
    the sweep's) whose metrics are the mean and standard deviation over its seeds."""

    def __init__(self, client: Any, run_id: str | None) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, spec: ExperimentSpec, name: str, start_time: int) -> SweepParent:
        if not spec.tracking.enabled:
            return cls(None, None)
        from gptkit.training.tracking import ensure_experiment, quick_timeouts, resolve_uri

        try:
            from mlflow.tracking import MlflowClient

            quick_timeouts()
            client = MlflowClient(resolve_uri(spec.tracking.uri))
            exp_id = ensure_experiment(client, spec.tracking.experiment or spec.name)
            run = client.create_run(
                exp_id, start_time=start_time, run_name=name, tags={"gptkit.kind": "sweep"}
            )
            client.log_param(run.info.run_id, "sweep", json.dumps(spec.sweep)[:6000])
            if spec.repeats > 1:
                client.log_param(run.info.run_id, "repeats", str(spec.repeats))
            return cls(client, run.info.run_id)
        except Exception as exc:
            print(f"gptkit: warning: no MLflow parent run for the sweep: {exc}", file=sys.stderr)
            return cls(None, None)

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
            return SweepParent(self.client, run.info.run_id)
        except Exception as exc:
            print(f"gptkit: warning: no MLflow group run for {name}: {exc}", file=sys.stderr)
            return SweepParent(None, None)

    def finish(self, results: list[dict[str, Any]], grouped: bool = False) -> None:
        """A sweep: the best run's figures; a group: mean and std over its seeds. Either way
        an end time after the last child."""
        if self.client is None:
            return
        from gptkit.training.tracking import time_ms

        try:
            metrics = group_metrics(results) if grouped else self._best(results)
            for key, value in metrics.items():
                if value is not None:
                    self.client.log_metric(self.run_id, key, float(value))
            self.client.set_terminated(self.run_id, end_time=time_ms())
        except Exception as exc:
            print(f"gptkit: warning: sweep parent run not updated: {exc}", file=sys.stderr)

    def _best(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        done = [r for r in results if r["best_val_loss"] is not None]
        if not done:
            return {}
        best = min(done, key=lambda r: r["best_val_loss"])
        self.client.set_tag(self.run_id, "gptkit.best_point", best["point"])
        groups = [g for g in group_summaries(results) if "val_loss_mean" in g]
        if groups:
            top = min(groups, key=lambda g: g["val_loss_mean"])
            self.client.set_tag(self.run_id, "gptkit.best_group", top["group"])
        return {
            "best_val_loss": best["best_val_loss"],
            "val_loss": best["val_loss"],
            "tokens_per_sec": best["tokens_per_sec"],
        }
