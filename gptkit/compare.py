"""``gptkit compare``: runs of an MLflow experiment side by side, and their validation curves."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

SKIP_PARAMS = ("n_params",)


def collect(client, experiment: str) -> list[dict[str, Any]]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "(none)"
        raise GptkitError(f"no MLflow experiment named {experiment!r}; experiments: {names}",
                          "Pass one of them, or --tracking-uri for another store.")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=500):
        if run.data.tags.get("gptkit.kind") in ("sweep", "compare"):
            continue
        if "val_loss" not in run.data.metrics:
            continue
        history = client.get_metric_history(run.info.run_id, "val_loss")
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "params": run.data.params,
            "val_loss": run.data.metrics["val_loss"],
            "best_val_loss": min(m.value for m in history),
            "tokens_per_sec": run.data.metrics.get("tokens_per_sec"),
            "curve": sorted((m.step, m.value) for m in history),
        })
    rows.sort(key=lambda r: r["name"] or "")
    return rows


def differing(rows: list[dict[str, Any]]) -> list[str]:
    """Spec fields whose values differ between the runs."""
    keys = sorted({k for r in rows for k in r["params"]} - set(SKIP_PARAMS))
    return [k for k in keys if len({r["params"].get(k, "-") for r in rows}) > 1]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), marker="o", markersize=3, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict[str, Any]], keys: list[str]) -> list[list[str]]:
    head = ["run", *keys, "final val", "best val", "tokens/s"]
    body = [[r["name"] or r["run_id"][:8], *[r["params"].get(k, "-") for k in keys],
             f"{r['val_loss']:.4f}", f"{r['best_val_loss']:.4f}",
             f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "-"] for r in rows]
    return [head, *body]


def compare(experiment: str | None, uri: str | None, out: Path | None) -> tuple[list[list[str]], Path]:
    from mlflow.tracking import MlflowClient

    from gptkit.tracking import resolve_uri

    client = MlflowClient(resolve_uri(uri))
    if experiment is None:
        exps = [e for e in client.search_experiments() if e.name != "Default"]
        if not exps:
            raise GptkitError("no MLflow experiments yet", "Train something: gptkit train SPEC")
        experiment = max(exps, key=lambda e: e.last_update_time or 0).name
    rows = collect(client, experiment)
    if not rows:
        raise GptkitError(f"experiment {experiment!r} has no runs with a validation loss yet")
    grid = table(rows, differing(rows))
    out = out or Path(f"compare-{experiment}.png")
    plot(rows, out, f"{experiment}: validation loss")
    try:  # the comparison is kept in MLflow too, as its own run
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        run = client.create_run(exp_id, run_name=time.strftime("compare-%Y%m%d-%H%M%S"),
                                tags={"gptkit.kind": "compare"})
        client.log_artifact(run.info.run_id, str(out))
        client.log_text(run.info.run_id, json.dumps(grid, indent=1), "comparison.json")
        client.set_terminated(run.info.run_id)
    except Exception as exc:
        print(f"gptkit: warning: comparison not logged to MLflow: {exc}")
    return grid, out
