"""The sweep's watcher: ``python -m gptkit.training.sweep_watch PID URI RUN_ID SWEEP_DIR``.

Started by a sweep in a session of its own; it waits for the sweep's process to end. If that
process is gone while its MLflow parent run is still RUNNING (a ``kill -9``, an out-of-memory
kill: nothing ran in it to say so), the parent and every run still RUNNING under it are marked
KILLED with the time it was noticed, and ``sweep.json`` says ``killed``. A sweep that ends
normally stops its watcher first. Imports nothing heavy until it has something to do.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from gptkit.errors import RunError
from gptkit.safeio import read_json
from gptkit.store.rundir import MAX_RUN_FILE

POLL_SECONDS = 0.3


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def mark_killed(uri: str, run_id: str) -> list[str]:
    """The run and its RUNNING descendants set KILLED now, the innermost first (so a parent
    seen KILLED has no child still RUNNING). Returns the ids it changed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    end, tree, todo = int(time.time() * 1000), [], [client.get_run(run_id)]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += client.search_runs(
            [current.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{current.info.run_id}'",
        )
    changed = []
    for run in reversed(tree):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED", end_time=end)
            changed.append(run.info.run_id)
    return changed


def mark_state(sweep_dir: Path) -> None:
    path = sweep_dir / "sweep.json"
    try:
        state = read_json(path, "sweep.json", MAX_RUN_FILE, RunError)
    except RunError:
        return
    if isinstance(state, dict) and state.get("status") == "running":
        state["status"] = "killed"
        tmp = path.with_name(path.name + ".watch.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    pid, uri, run_id, sweep_dir = int(argv[0]), argv[1], argv[2], Path(argv[3])
    while alive(pid):
        time.sleep(POLL_SECONDS)
    try:
        if mark_killed(uri, run_id):
            mark_state(sweep_dir)
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
