"""Hostile run folders (issue 26): a FIFO, a device or a directory where a run's files belong,
and run.json / .lock values that are not what gptkit writes. `gptkit runs` lists the other
runs and shows the bad one as unreadable; `train --resume` exits 2; nothing hangs."""

import json
import os
import shutil

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


def _run(root, name, run_json=None):
    folder = root / "runs" / name / "20260101-000000"
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text("name: x\n")
    if run_json is not None:
        (folder / "run.json").write_text(run_json)
    return folder


def test_runs_lists_the_good_runs_and_shows_each_bad_one_as_unreadable(tmp_path):
    _run(tmp_path, "good", json.dumps({"name": "good one", "created": 1.7e9, "status": "FINISHED"}))
    _run(tmp_path, "huge-time", '{"name": "a", "created": 1e300}')
    _run(tmp_path, "nan-time", '{"name": "a", "created": NaN}')
    _run(tmp_path, "list-name", '{"name": ["a"], "created": 1.7e9}')
    os.symlink("/dev/zero", _run(tmp_path, "dev-zero") / "run.json")
    os.mkfifo(_run(tmp_path, "fifo") / "run.json")
    (
        _run(tmp_path, "metrics-zero", '{"name": "m", "created": 1.7e9}') / "metrics.jsonl"
    ).symlink_to("/dev/zero")
    running = '{"name": "r", "created": 1.7e9, "status": "RUNNING"}'
    (_run(tmp_path, "lock-dir", running) / ".lock").mkdir()
    (_run(tmp_path, "lock-huge", running) / ".lock").write_text(f"{2**70}\n")
    os.mkfifo(_run(tmp_path, "lock-fifo", running) / ".lock")

    result = run_cli("runs", "--json", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {r["folder"].split("/")[1]: r for r in json.loads(result.stdout)}
    assert rows["good"]["name"] == "good one" and rows["good"]["status"] == "FINISHED"
    assert rows["metrics-zero"]["status"] == "UNKNOWN"  # its metrics are skipped, not read
    expected = {
        "huge-time": "created is not a time",
        "nan-time": "created is not a time",
        "list-name": "name is not a string",
        "dev-zero": "is a character device",
        "fifo": "is a FIFO",
        "lock-dir": "is a directory",
        "lock-huge": "which is not a pid",
        "lock-fifo": "is a FIFO",
    }
    for name, needle in expected.items():
        assert rows[name]["status"].startswith("UNREADABLE ("), rows[name]
        assert needle in rows[name]["status"], rows[name]
    table = run_cli("runs", cwd=tmp_path, timeout=60)  # the table prints too
    assert table.returncode == 0 and "good one" in table.stdout, table.stderr


def _resume(run, cwd):
    return run_cli(
        "train",
        "--resume",
        "--run-dir",
        run,
        "--no-progress",
        "--set",
        "tracking.enabled=false",
        "--set",
        "train.max_steps=30",
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda p: os.mkfifo(p), "is a FIFO"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text(f"{2**70}\n"), "which is not a pid"),
    ],
    ids=["fifo", "directory", "2**70"],
)
def test_resume_over_a_lock_that_is_not_gptkits_exits_2(smoke_run, tmp_path, damage, needle):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    damage(run / ".lock")
    assert_user_error(_resume(run, tmp_path), needle, "remove it")
    assert (run / ".lock").exists() or (run / ".lock").is_symlink()  # the user's, left alone


def test_a_fifo_as_the_mlflow_link_is_not_waited_on(tmp_path):
    import subprocess
    import sys

    run = _run(tmp_path, "r")
    os.mkfifo(run / "mlflow.json")
    code = (
        "import sys; from pathlib import Path\n"
        "from gptkit.store.rundir import RunDir\n"
        "from gptkit.training.tracking import read_mlflow_link\n"
        "run = RunDir(Path(sys.argv[1]))\n"
        "assert read_mlflow_link(run) == {}\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_resume_over_a_fifo_latest_pointer_uses_the_checkpoints_themselves(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1].name
    (run / "checkpoints" / "latest").unlink()
    os.mkfifo(run / "checkpoints" / "latest")
    result = _resume(run, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"from {newest} (step" in result.stdout, result.stdout


def test_resume_over_a_checkpoint_file_that_is_a_fifo_exits_2(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "state.pt").unlink()
        os.mkfifo(ckpt / "state.pt")  # torch.load would wait on it forever
    assert_user_error(_resume(run, tmp_path), "is a FIFO")


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_resume_over_a_fifo_sweep_record_exits_2(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep-spec.yaml").write_text(SMOKE.read_text())
    os.mkfifo(sweep / "sweep.json")
    result = run_cli("train", "--resume", "--run-dir", sweep, cwd=tmp_path, timeout=60)
    assert_user_error(result, "sweep.json", "is a FIFO")
