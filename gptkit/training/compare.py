"""``gptkit compare``: runs of an MLflow experiment side by side, and their validation curves.

Reading only: a comparison adds nothing to the experiment unless ``--log`` asks for it, and then
it goes to a separate ``<experiment>-comparisons`` experiment, out of the run list.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

SKIP_PARAMS = ("n_params",)
HIDDEN_KINDS = ("sweep", "compare")


def collect(client: Any, experiment: str) -> list[dict[str, Any]]:
    """One row per finished-enough run (it has a validation loss), best first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "(none)"
        raise GptkitError(f"no MLflow experiment named {experiment!r}; experiments: {names}",
                          "Pass one of them, or --tracking-uri for another store.")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=500):
        metrics = run.data.metrics
        if run.data.tags.get("gptkit.kind") in HIDDEN_KINDS or "val_loss" not in metrics:
            continue
        history = client.get_metric_history(run.info.run_id, "val_loss")
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "params": run.data.params,
            "val_loss": metrics.get("summary.final_val_loss", metrics["val_loss"]),
            "best_val_loss": min(m.value for m in history),
            # The whole run's rate (summary), not the last logging window's.
            "tokens_per_sec": metrics.get("summary.tokens_per_sec", metrics.get("tokens_per_sec")),
            "curve": sorted((m.step, m.value) for m in history),
        })
    rows.sort(key=lambda r: r["val_loss"])
    return rows


def differing(rows: list[dict[str, Any]]) -> list[str]:
    """Spec fields whose values differ between the runs, leaving out fields that differ only
    because one component kind has them and another does not (rope's ``theta`` beside
    ``learned``): the ``.kind`` column already says that."""
    keys = sorted({k for r in rows for k in r["params"]} - set(SKIP_PARAMS))
    out = []
    for k in keys:
        if len({r["params"].get(k, "-") for r in rows}) < 2:
            continue
        slot = k.rsplit(".", 1)[0]
        if not k.endswith(".kind") and f"{slot}.kind" in keys:
            present = {r["params"][k] for r in rows if k in r["params"]}
            if len(present) < 2:
                continue
        out.append(k)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, r in enumerate(rows):
        if r["curve"]:
            label = (r["name"] or r["run_id"][:8]) + (" (best)" if i == 0 else "")
            ax.plot(*zip(*r["curve"]), marker="o", markersize=3, label=label,
                    linewidth=2.5 if i == 0 else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict[str, Any]], keys: list[str]) -> list[list[str]]:
    """Header + one line per run, best (lowest final val loss) first and marked."""
    head = ["", "run", *keys, "final val", "best val", "tokens/s"]
    body = [["*" if i == 0 else "", r["name"] or r["run_id"][:8],
             *[r["params"].get(k, "-") for k in keys],
             f"{r['val_loss']:.4f}", f"{r['best_val_loss']:.4f}",
             f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "-"]
            for i, r in enumerate(rows)]
    return [head, *body]


def compare(experiment: str | None, uri: str | None, out: Path | None,
            log: bool = False) -> tuple[list[list[str]], Path]:
    """The comparison table and the curves' plot; with ``log``, also kept in MLflow."""
    from gptkit.training.tracking import quick_timeouts, resolve_uri

    quick_timeouts()
    uri = resolve_uri(uri)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = experiment or _latest_experiment(client)
        rows = collect(client, experiment)
    except GptkitError:
        raise
    except Exception as exc:
        raise GptkitError(f"cannot read MLflow at {uri}: {type(exc).__name__}: {str(exc)[:300]}",
                          "Check --tracking-uri / $MLFLOW_TRACKING_URI, or that the server "
                          "is up.") from None
    if not rows:
        raise GptkitError(f"experiment {experiment!r} has no runs with a validation loss yet")
    grid = table(rows, differing(rows))
    out = out or Path(f"compare-{experiment}.png")
    plot(rows, out, f"{experiment}: validation loss (best: {rows[0]['name']})")
    if log:
        _log_comparison(client, experiment, grid, out)
    return grid, out


def _latest_experiment(client: Any) -> str:
    exps = [e for e in client.search_experiments()
            if e.name != "Default" and not e.name.endswith("-comparisons")]
    if not exps:
        raise GptkitError("no MLflow experiments yet", "Train something: gptkit train SPEC")
    return max(exps, key=lambda e: e.last_update_time or 0).name


def _log_comparison(client: Any, experiment: str, grid: list[list[str]], plot_file: Path) -> None:
    """Keep the comparison as a run of ``<experiment>-comparisons`` (not among the runs)."""
    from gptkit.training.tracking import ensure_experiment

    try:
        exp_id = ensure_experiment(client, f"{experiment}-comparisons")
        run = client.create_run(exp_id, run_name=time.strftime(f"{experiment} %Y-%m-%d %H:%M:%S"),
                                tags={"gptkit.kind": "compare", "gptkit.compared": experiment})
        client.log_artifact(run.info.run_id, str(plot_file))
        client.log_text(run.info.run_id, json.dumps(grid, indent=1), "comparison.json")
        client.set_terminated(run.info.run_id)
        print(f"comparison logged to MLflow experiment '{experiment}-comparisons'")
    except Exception as exc:
        print(f"gptkit: warning: comparison not logged to MLflow: {exc}")
