"""``gptkit runs``: the runs on disk, newest first, with what each one reached."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gptkit.errors import RunError
from gptkit.store.rundir import RUNS_ROOT, RunDir


def run_row(run: RunDir) -> dict[str, Any]:
    """One run's headline: name, status, steps, losses, tokens/s, wall time, folder. A run
    whose run.json or .lock cannot be read is listed as UNREADABLE with the reason."""
    try:
        info = run.read_info()
        summary = info.get("summary") if isinstance(info.get("summary"), dict) else {}
        status = str(info.get("status") or "UNKNOWN")
        if status == "RUNNING" and run.writer_pid() is None:
            status = "STOPPED"  # its process is gone (killed) without saying so
    except RunError as exc:
        return _unreadable_row(run, exc)
    reason = info.get("stop_reason")
    if isinstance(reason, str) and reason not in ("max_steps", "interrupted", "failed"):
        status = f"{status} ({reason})"  # e.g. FINISHED (early_stop)
    metrics = run.metrics() if not summary else []
    vals = [r["val_loss"] for r in metrics if isinstance(r.get("val_loss"), (int, float))]
    steps = [r["step"] for r in metrics if isinstance(r.get("step"), int)]
    return {
        "name": info.get("name") or run.path.name,
        "status": status,
        "steps": summary.get("steps", max(steps) if steps else 0),
        "best_val_loss": summary.get("best_val_loss", min(vals) if vals else None),
        "final_val_loss": summary.get("final_val_loss", vals[-1] if vals else None),
        "tokens_per_sec": summary.get("tokens_per_sec"),
        "wall_time_s": summary.get("wall_time_s"),
        "created": run.created(),
        "folder": str(run.path),
        "stop_reason": reason if isinstance(reason, str) else None,
    }


def _unreadable_row(run: RunDir, exc: RunError) -> dict[str, Any]:
    return {
        "name": run.path.name,
        "status": f"UNREADABLE ({exc.message})",
        "steps": 0,
        "best_val_loss": None,
        "final_val_loss": None,
        "tokens_per_sec": None,
        "wall_time_s": None,
        "created": run.created(),
        "folder": str(run.path),
        "stop_reason": None,
    }


def list_runs(experiment: str | None = None, root: Path = RUNS_ROOT) -> list[dict[str, Any]]:
    """Runs under ``runs/`` (or ``runs/<experiment>``), newest first by creation time."""
    folder = root / experiment if experiment else root
    runs = sorted(
        RunDir.find(folder, depth=4 if experiment is None else 3),
        key=lambda r: r.created(),
        reverse=True,
    )
    return [run_row(r) for r in runs]


def format_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    head = [
        "name",
        "status",
        "steps",
        "best val",
        "final val",
        "tokens/s",
        "wall time",
        "created",
        "folder",
    ]
    body = [
        [
            r["name"],
            r["status"],
            str(r["steps"]),
            num(r["best_val_loss"], ".4f"),
            num(r["final_val_loss"], ".4f"),
            num(r["tokens_per_sec"], ",.0f"),
            num(r["wall_time_s"], ".1f") + ("s" if r["wall_time_s"] is not None else ""),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
            r["folder"],
        ]
        for r in rows
    ]
    return [head, *body]
