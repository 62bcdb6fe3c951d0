"""Sweeps: a grid over spec fields, trained one point after another, as child MLflow runs of
one parent run."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.run import RUNS_ROOT
from gptkit.spec import ExperimentSpec, validate_spec


def sweep_points(sweep: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid, as ``--set`` style overrides."""
    keys = list(sweep)
    for key in keys:
        if not sweep[key]:
            raise GptkitError(f"sweep.{key}: give at least one value")
    return [[f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(sweep[k] for k in keys))]


def point_name(overrides: list[str]) -> str:
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        short = key.split(".")[-1] if not key.endswith(".kind") else key.split(".")[-2]
        parts.append(f"{short}={value.strip(chr(34))}")
    return ",".join(parts)


def run_sweep(raw: dict[str, Any], source: str, overrides: list[str], spec: ExperimentSpec,
              run_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Validate every point first, then train them in order. Returns one summary per point."""
    from gptkit.tracking import resolve_uri
    from gptkit.train import Trainer

    base = {k: v for k, v in raw.items() if k != "sweep"}
    points = sweep_points(spec.sweep)
    specs = [validate_spec(base, f"{source} (sweep point {point_name(p)})", [*overrides, *p])
             for p in points]  # a bad point fails before anything trains
    root = run_dir or RUNS_ROOT / spec.name / time.strftime("sweep-%Y%m%d-%H%M%S")
    parent = None
    if spec.tracking.enabled:
        parent = _parent_run(resolve_uri(spec.tracking.uri), spec.tracking.experiment or spec.name,
                             root.name, spec)
    results = []
    for i, (point, point_spec) in enumerate(zip(points, specs), 1):
        name = point_name(point)
        print(f"=== sweep point {i}/{len(points)}: {name}", flush=True)
        folder = root / f"{i:02d}-{name.replace('=', '-').replace(',', '_')}"
        result = Trainer(point_spec, run_dir=folder, progress=progress, parent_run_id=parent,
                         run_name=name).run()
        results.append({"point": name, "run_dir": str(folder), "val_loss": result.val_loss,
                        "best_val_loss": result.best_val_loss,
                        "tokens_per_sec": result.tokens_per_sec})
    (root / "sweep.json").write_text(json.dumps({"parent_run_id": parent, "points": results},
                                                indent=2))
    return results


def _parent_run(uri: str, experiment: str, name: str, spec: ExperimentSpec) -> str | None:
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=name, tags={"gptkit.kind": "sweep"})
        client.log_param(run.info.run_id, "sweep", json.dumps(spec.sweep)[:6000])
        client.set_terminated(run.info.run_id)
        return run.info.run_id
    except Exception as exc:  # tracking never stops training
        print(f"gptkit: warning: no MLflow parent run for the sweep: {exc}", flush=True)
        return None
