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
from gptkit.spec import ExperimentSpec, validate_spec
from gptkit.training.rundir import RunDir, default_run_name, short_override

MAX_POINTS = 1000


def sweep_points(sweep: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid, as ``--set`` style overrides."""
    keys = list(sweep)
    for key in keys:
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise GptkitError(f"sweep.{key}: give a list of at least one value")
    size = math.prod(len(sweep[k]) for k in keys)
    if size > MAX_POINTS:  # counted before anything is built
        raise GptkitError(f"sweep: the grid has {size:,} points; at most {MAX_POINTS} are run",
                          "Sweep fewer values, or split the grid into several specs.")
    return [[f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(sweep[k] for k in keys))]


def point_name(overrides: list[str]) -> str:
    """A grid point's short, readable name: ``positional=rope lr=0.003``."""
    return " ".join(short_override(o) for o in overrides)


def run_sweep(raw: dict[str, Any], source: str, overrides: list[str], spec: ExperimentSpec,
              run_dir: Path | None = None, progress: bool = True,
              command: str | None = None) -> list[dict[str, Any]]:
    """Validate every point first, then train them in order. Returns one summary per point."""
    from gptkit.training.loop import Trainer
    from gptkit.training.tracking import time_ms

    base = {k: v for k, v in raw.items() if k != "sweep"}
    points = sweep_points(spec.sweep)
    specs = [validate_spec(base, f"{source} (sweep point {point_name(p)})", [*overrides, *p])
             for p in points]  # a bad point fails before anything trains
    root = run_dir or RunDir.new_sweep(spec.name)
    parent = SweepParent.start(spec, default_run_name(spec.name, overrides) + " sweep", time_ms())
    results = []
    for i, (point, point_spec) in enumerate(zip(points, specs), 1):
        name = point_name(point)
        print(f"=== sweep point {i}/{len(points)}: {name}", flush=True)
        run = RunDir.sweep_point(root, i, name)
        result = Trainer(point_spec, run_dir=run.path, progress=progress,
                         parent_run_id=parent.run_id, run_name=name,
                         overrides=[*overrides, *point], command=command).run()
        results.append({"point": name, "run_dir": str(run.path), "val_loss": result.val_loss,
                        "best_val_loss": result.best_val_loss,
                        "tokens_per_sec": result.tokens_per_sec})
    RunDir.sweep_file(root).write_text(json.dumps({"parent_run_id": parent.run_id,
                                                   "points": results}, indent=2))
    parent.finish(results)
    return results


class SweepParent:
    """The MLflow run the points nest under (never fatal: tracking never stops training)."""

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
            run = client.create_run(exp_id, start_time=start_time, run_name=name,
                                    tags={"gptkit.kind": "sweep"})
            client.log_param(run.info.run_id, "sweep", json.dumps(spec.sweep)[:6000])
            return cls(client, run.info.run_id)
        except Exception as exc:
            print(f"gptkit: warning: no MLflow parent run for the sweep: {exc}", file=sys.stderr)
            return cls(None, None)

    def finish(self, results: list[dict[str, Any]]) -> None:
        """The best point's figures on the parent, and an end time after the last child."""
        if self.client is None:
            return
        from gptkit.training.tracking import time_ms

        try:
            done = [r for r in results if r["best_val_loss"] is not None]
            if done:
                best = min(done, key=lambda r: r["best_val_loss"])
                metrics = {"best_val_loss": best["best_val_loss"], "val_loss": best["val_loss"],
                           "tokens_per_sec": best["tokens_per_sec"]}
                for key, value in metrics.items():
                    if value is not None:
                        self.client.log_metric(self.run_id, key, float(value))
                self.client.set_tag(self.run_id, "gptkit.best_point", best["point"])
            self.client.set_terminated(self.run_id, end_time=time_ms())
        except Exception as exc:
            print(f"gptkit: warning: sweep parent run not updated: {exc}", file=sys.stderr)
