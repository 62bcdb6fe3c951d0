"""``gptkit compare``: runs of an MLflow experiment side by side, and their validation curves.

Reading only: a comparison adds nothing to the experiment unless ``--log`` asks for it, and then
it goes to a separate ``<experiment>-comparisons`` experiment, out of the run list.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.training.tracking import params_of

SKIP_PARAMS = ("n_params",)
HIDDEN_KINDS = ("sweep", "group", "compare")  # parents and comparisons are not runs to rank
SEED_PARAMS = ("seed", "repeats")  # runs that differ only in these are repeats of one config


def collect(client: Any, experiment: str) -> list[dict[str, Any]]:
    """One row per finished-enough run of an experiment (it has a validation loss), best first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise GptkitError(
            f"no MLflow experiment named {experiment!r}; experiments: {_names(client)}",
            "Pass one of them, or --tracking-uri for another store.",
        )
    return rows_of(client, client.search_runs([exp.experiment_id], max_results=500))


def _names(client: Any) -> str:
    return ", ".join(e.name for e in client.search_experiments()) or "(none)"


def rows_of(client: Any, runs: list[Any]) -> list[dict[str, Any]]:
    """The rows of these MLflow runs (parents, comparisons and runs without a validation loss
    left out; each run once), best first."""
    rows, seen = [], set()
    for run in runs:
        metrics = run.data.metrics
        if run.info.run_id in seen or run.info.lifecycle_stage == "deleted":
            continue
        seen.add(run.info.run_id)
        if run.data.tags.get("gptkit.kind") in HIDDEN_KINDS or "val_loss" not in metrics:
            continue
        history = client.get_metric_history(run.info.run_id, "val_loss")
        rows.append(
            {
                "run_id": run.info.run_id,
                # A pruned trial's loss is from the step it stopped at: said in its name.
                "name": (run.info.run_name or "")
                + (" (pruned)" if run.data.tags.get("gptkit.stop_reason") == "pruned" else ""),
                "params": params_of(run),
                "val_loss": metrics.get("summary.final_val_loss", metrics["val_loss"]),
                "best_val_loss": min(m.value for m in history),
                # The whole run's rate (summary), not the last logging window's.
                "tokens_per_sec": metrics.get(
                    "summary.tokens_per_sec", metrics.get("tokens_per_sec")
                ),
                "curve": sorted((m.step, m.value) for m in history),
                "status": run.info.status,
                "step": max((m.step for m in history), default=0),
            }
        )
    rows.sort(key=lambda r: r["val_loss"])
    return rows


def finished_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs that finished (a pruned trial or an early stop included), and what is said of
    the others (killed, failed, still running): their loss is from wherever they stopped, so
    they are left out, unless no run finished (then all are shown, and that is said)."""
    done = [r for r in rows if r["status"] == "FINISHED"]
    others = [r for r in rows if r["status"] != "FINISHED"]
    if not others:
        return rows, []
    shown = ", ".join(f"'{r['name']}' ({r['status']} at step {r['step']})" for r in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    if not done:
        return rows, [f"no run finished; shown as they stopped: {shown}{more}"]
    return done, [f"left out {len(others)} run(s) that did not finish: {shown}{more}"]


def select_runs(client: Any, target: str) -> list[Any]:
    """The MLflow runs one ``compare`` target names: a spec file (its runs), a folder (the runs
    in it: a run, a sweep, ``runs/<name>``), an experiment, or a spec name (its runs in any
    experiment: variants made with ``extends:`` share their root's experiment)."""
    path = Path(target)
    if path.is_dir():
        return _folder_runs(client, path)
    if path.is_file():
        from gptkit.spec.files import load_spec

        spec = load_spec(path)
        return _spec_runs(client, spec.name, target)
    exp = client.get_experiment_by_name(target)
    if exp is not None:
        return list(client.search_runs([exp.experiment_id], max_results=500))
    runs = _spec_runs(client, target, None)
    if not runs:
        raise GptkitError(
            f"no MLflow experiment or spec named {target!r} (and no such file or folder); "
            f"experiments: {_names(client)}",
            "Pass an experiment, a spec file or a run folder, or --tracking-uri for another store.",
        )
    return runs


def _spec_runs(client: Any, name: str, file: str | None) -> list[Any]:
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = (
        client.search_runs(
            ids, filter_string=f"tags.`gptkit.spec_name` = '{name}'", max_results=1000
        )
        if ids and "'" not in name
        else []
    )
    if file is not None and not runs:
        raise GptkitError(
            f"{file}: no MLflow runs of spec '{name}' yet", f"Train it: gptkit train {file}"
        )
    return list(runs)


def _folder_runs(client: Any, folder: Path) -> list[Any]:
    from gptkit.store.rundir import RunDir
    from gptkit.training.tracking import read_mlflow_link

    runs, elsewhere = [], set()
    for run in RunDir.find(folder):
        link = read_mlflow_link(run)
        if link:
            try:
                runs.append(client.get_run(link["run_id"]))
            except Exception:  # a run of another store, or deleted: not comparable here
                if isinstance(link.get("uri"), str):
                    elsewhere.add(link["uri"])
                continue
    if not runs:
        where = sorted(u for u in elsewhere if u != client.tracking_uri)
        raise GptkitError(
            f"{folder}: no runs with an MLflow record in this store ({client.tracking_uri})"
            + (f"; its runs were tracked at {', '.join(where)}" if where else ""),
            f"Compare them there: --tracking-uri {where[0]}"
            if where
            else "Pass run folders made by 'gptkit train' with tracking on (or --tracking-uri).",
        )
    return runs


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


def group_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose params differ only by seed, as one row each: n, mean and standard deviation
    of final and best val loss, the mean curve and its spread. Best (lowest mean final) first."""
    from gptkit.training.stats import mean_std

    buckets: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        same = {k: v for k, v in r["params"].items() if k not in SEED_PARAMS}
        buckets.setdefault(json.dumps(same, sort_keys=True), []).append(r)
    groups = []
    for members in buckets.values():
        members, repeated = _one_per_seed(members)
        final, final_std = mean_std([m["val_loss"] for m in members])
        best, best_std = mean_std([m["best_val_loss"] for m in members])
        rates = [m["tokens_per_sec"] for m in members if m["tokens_per_sec"]]
        groups.append(
            {
                "name": _group_name(members),
                "n": len(members),
                "runs": members,
                "run_ids": [m["run_id"] for m in members],
                "seeds": [m["params"].get("seed") for m in members],
                "params": {k: v for k, v in members[0]["params"].items() if k not in SEED_PARAMS},
                "val_loss": final,
                "val_loss_std": final_std,
                "best_val_loss": best,
                "best_val_loss_std": best_std,
                "finals": [m["val_loss"] for m in members],
                "tokens_per_sec": sum(rates) / len(rates) if rates else None,
                "curve": _mean_curve([m["curve"] for m in members]),
                "repeated": repeated,
            }
        )
    groups.sort(key=lambda g: g["val_loss"])
    _unique_names(groups)
    return groups


def _one_per_seed(members: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One run per seed: runs with the same params and seed (a copy of a run, a run trained
    twice) are one training, not independent repeats, so only the first (best) is counted;
    the others' names are returned, to be said."""
    kept: dict[str, dict[str, Any]] = {}
    repeated = []
    for m in members:
        seed = m["params"].get("seed")
        if seed is None:  # a run that records no seed: nothing to say it repeats another
            kept[m["run_id"]] = m
            continue
        if seed in kept:
            repeated.append(f"'{m['name']}' (seed {seed}, as '{kept[seed]['name']}')")
        else:
            kept[seed] = m
    return list(kept.values()), repeated


def _unique_names(groups: list[dict[str, Any]]) -> None:
    """Groups of the same name (runs of several sweeps in one folder, the same label in two
    experiments) get their first run's id after it, so the verdict names one row."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g["name"]] = counts.get(g["name"], 0) + 1
    for g in groups:
        if counts[g["name"]] > 1:
            g["name"] = f"{g['name']} [{g['run_ids'][0][:8]}]"


def caveats(groups: list[dict[str, Any]]) -> list[str]:
    """What the reader of the table must know: repeated seeds left out, and losses per token
    of different tokenizers (not comparable: a token is not the same amount of text)."""
    out = [
        f"{g['name']}: {r} has the same params and seed; counted once (not an independent repeat)"
        for g in groups
        for r in g["repeated"]
    ]
    kinds = {
        (g["params"]["tokenizer.kind"], g["params"].get("model.vocab_size", "?"))
        for g in groups
        if "tokenizer.kind" in g["params"]  # a run that records none is not said to differ
    }
    if len(kinds) > 1:
        shown = ", ".join(f"{k} (vocab {v})" for k, v in sorted(kinds))
        out.append(
            f"the runs use different tokenizers: {shown}; validation loss is per token, so it "
            "is not comparable across them (compare bits per byte: gptkit eval RUN --data FILE)"
        )
    return out


def _group_name(members: list[dict[str, Any]]) -> str:
    """The runs' common name with their ``seed=N`` left out."""
    names = {re.sub(r"\s*\bseed=\S+", "", m["name"] or "").strip() for m in members}
    if len(members) > 1 and names == {""}:  # runs named by their seed only: the spec's name
        return members[0]["params"].get("name") or members[0]["name"]
    if len(members) == 1 or len(names) != 1 or not next(iter(names)):
        return members[0]["name"] or members[0]["run_id"][:8]
    return names.pop()


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(step, mean, std) over the runs that evaluated at that step."""
    from gptkit.training.stats import mean_std

    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [(step, *mean_std(values)) for step, values in sorted(by_step.items())]


def separation(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Is the best group's mean final val loss separated from the next one's? Welch's t-test
    over their seeds; ``separated`` is None when it cannot be told (fewer than 2 runs)."""
    from gptkit.training.stats import ALPHA, welch

    if len(groups) < 2:
        return {"separated": None, "text": "one group: nothing to separate"}
    best, nxt = groups[0], groups[1]
    out: dict[str, Any] = {
        "best": best["name"],
        "next": nxt["name"],
        "alpha": ALPHA,
        "difference": best["val_loss"] - nxt["val_loss"],
    }
    head = f"best '{best['name']}' vs next '{nxt['name']}': {out['difference']:+.4f} final val loss"
    if best["n"] < 2 or nxt["n"] < 2:
        return {
            **out,
            "separated": None,
            "text": f"{head}; cannot tell whether that is real: it needs 2 or more runs per "
            "group (repeat with repeats: N or sweep: {seed: [...]})",
        }
    test = welch(best["finals"], nxt["finals"])
    separated = test.p < ALPHA
    verdict = (
        "separated"
        if separated
        else "not separated: the difference is within the seed-to-seed spread"
    )
    df = f"{test.df:.1f}" if test.df == test.df else "-"
    return {
        **out,
        "separated": separated,
        "p_value": test.p,
        "t": test.t,
        "df": test.df,
        "text": f"{head} (n={best['n']} vs {nxt['n']}); Welch t = {test.t:.2f}, df = {df}, "
        f"p = {test.p:.3g} -> {verdict} (at p < {ALPHA})",
    }


def plot(groups: list[dict[str, Any]], path: Path, title: str) -> None:
    """One line per group (its mean), with a band of one standard deviation over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, g in enumerate(groups):
        if not g["curve"]:
            continue
        steps, mean, std = zip(*g["curve"])
        label = g["name"] + (f" (n={g['n']})" if g["n"] > 1 else "") + (" (best)" if i == 0 else "")
        (line,) = ax.plot(
            steps, mean, marker="o", markersize=3, label=label, linewidth=2.5 if i == 0 else 1.2
        )
        if g["n"] > 1:
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=line.get_color(),
                alpha=0.2,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def table(groups: list[dict[str, Any]], keys: list[str]) -> list[list[str]]:
    """Header + one line per group of seeds, best (lowest mean final val loss) first and marked."""
    head = ["", "run", *keys, "n", "final val", "best val", "tokens/s"]
    body = [
        [
            "*" if i == 0 else "",
            g["name"],
            *[g["params"].get(k, "-") for k in keys],
            str(g["n"]),
            _pm(g["val_loss"], g["val_loss_std"], g["n"]),
            _pm(g["best_val_loss"], g["best_val_loss_std"], g["n"]),
            f"{g['tokens_per_sec']:,.0f}" if g["tokens_per_sec"] else "-",
        ]
        for i, g in enumerate(groups)
    ]
    return [head, *body]


@dataclass
class Comparison:
    """What ``gptkit compare`` shows: the table, the separation verdict, the plot's path."""

    experiment: str
    grid: list[list[str]]
    groups: list[dict[str, Any]]
    verdict: dict[str, Any]
    plot: Path
    caveats: list[str]

    def to_json(self) -> dict[str, Any]:
        keep = (
            "name",
            "n",
            "seeds",
            "run_ids",
            "val_loss",
            "val_loss_std",
            "best_val_loss",
            "best_val_loss_std",
            "tokens_per_sec",
        )
        return {
            "experiment": self.experiment,
            "plot": str(self.plot),
            "verdict": self.verdict,
            "caveats": self.caveats,
            "groups": [{k: g[k] for k in keep} for g in self.groups],
        }


def compare(
    experiment: str | list[str] | None, uri: str | None, out: Path | None, log: bool = False
) -> Comparison:
    """The comparison table (runs that differ only by seed grouped), whether the best group is
    separated from the next, and the curves' plot; with ``log``, also kept in MLflow.
    ``experiment``: one target or several (experiments, spec files, run folders, spec names;
    see ``select_runs``); none: the most recently updated experiment."""
    from gptkit.training.tracking import quick_timeouts, resolve_uri, sqlite_path

    quick_timeouts()
    uri = resolve_uri(uri)
    targets = [experiment] if isinstance(experiment, str) else list(experiment or [])
    store = sqlite_path(uri)
    if store is not None and not store.exists():  # MLflow would create it: compare adds nothing
        raise GptkitError(
            f"no MLflow store at {store}: nothing was tracked there (a run trained with "
            "tracking.enabled=false is not in MLflow)",
            "Run where the runs were trained, or pass --tracking-uri / $MLFLOW_TRACKING_URI.",
        )
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        targets = targets or [_latest_experiment(client)]
        rows = rows_of(client, [run for t in targets for run in select_runs(client, t)])
    except GptkitError:
        raise
    except Exception as exc:
        raise GptkitError(
            f"cannot read MLflow at {uri}: {type(exc).__name__}: {str(exc)[:300]}",
            "Check --tracking-uri / $MLFLOW_TRACKING_URI, or that the server is up.",
        ) from None
    label = "+".join(Path(t).name or t for t in targets)
    if not rows:
        raise GptkitError(f"{', '.join(targets)}: no runs with a validation loss yet")
    rows, unfinished = finished_rows(rows)
    groups = group_runs(rows)
    result = Comparison(
        label,
        table(groups, differing(groups)),
        groups,
        separation(groups),
        out or Path(f"compare-{re.sub(r'[^A-Za-z0-9_.+-]', '-', label)}.png"),
        unfinished + caveats(groups),
    )
    plot(groups, result.plot, f"{label}: validation loss (best: {groups[0]['name']})")
    if log:
        _log_comparison(client, label, result.grid, result.plot)
    return result


def _latest_experiment(client: Any) -> str:
    exps = [
        e
        for e in client.search_experiments()
        if e.name != "Default" and not e.name.endswith("-comparisons")
    ]
    if not exps:
        raise GptkitError("no MLflow experiments yet", "Train something: gptkit train SPEC")
    return max(exps, key=lambda e: e.last_update_time or 0).name


def _log_comparison(client: Any, experiment: str, grid: list[list[str]], plot_file: Path) -> None:
    """Keep the comparison as a run of ``<experiment>-comparisons`` (not among the runs)."""
    from gptkit.training.tracking import ensure_experiment

    try:
        exp_id = ensure_experiment(client, f"{experiment}-comparisons")
        run = client.create_run(
            exp_id,
            run_name=time.strftime(f"{experiment} %Y-%m-%d %H:%M:%S"),
            tags={"gptkit.kind": "compare", "gptkit.compared": experiment},
        )
        client.log_artifact(run.info.run_id, str(plot_file))
        client.log_text(run.info.run_id, json.dumps(grid, indent=1), "comparison.json")
        client.set_terminated(run.info.run_id)
        print(f"comparison logged to MLflow experiment '{experiment}-comparisons'")
    except Exception as exc:
        print(f"gptkit: warning: comparison not logged to MLflow: {exc}")
