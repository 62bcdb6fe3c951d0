"""DDP through torchrun (gloo on CPU) with real processes; sweeps and `gptkit compare`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from gptkit.store.checkpoint import read_pointer
from tests.conftest import ROOT
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # every test here trains, serves or spawns the CLI

SMOKE = ROOT / "experiments" / "smoke.yaml"
COMMON = [
    "--no-progress",
    "--set",
    "tracking.enabled=false",
    "--set",
    "train.threads=1",
    "--set",
    "model.dropout=0.0",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_every=4",
    "--set",
    "train.sample_tokens=0",
    "--set",
    "train.log_every=1",
]


def torchrun(*args, cwd, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "gptkit",
        "train",
        str(SMOKE),
        *map(str, args),
    ]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


def weights(run):
    return load_file(
        run / "checkpoints" / read_pointer(run / "checkpoints" / "latest") / "model.safetensors"
    )


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    single = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        tmp_path / "one",
        *COMMON,
        "--set",
        "train.max_steps=8",
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr
    proc = torchrun(
        "--run-dir", tmp_path / "two", *COMMON, "--set", "train.max_steps=8", cwd=tmp_path
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("done:") == 1  # one voice: rank 0
    assert "x 2 processes" in out
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # Rank 0 alone wrote the run directory.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step-*")) == [
        "step-000004",
        "step-000008",
    ]


def test_two_process_run_killed_and_resumed_continues_exactly(tmp_path):
    ref = torchrun(
        "--run-dir", tmp_path / "ref", *COMMON, "--set", "train.max_steps=12", cwd=tmp_path
    )
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    proc = torchrun(
        "--run-dir", tmp_path / "run", *COMMON, "--set", "train.max_steps=12", cwd=tmp_path
    )
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step-000004").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, for real
    proc.wait(timeout=60)
    again = torchrun(
        "--run-dir",
        tmp_path / "run",
        "--resume",
        *COMMON,
        "--set",
        "train.max_steps=12",
        cwd=tmp_path,
    )
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resuming" in out
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_makes_child_runs_and_compare_shows_what_differs(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        SMOKE.read_text() + "sweep:\n  model.positional.kind: [learned, rope]\n"
        "  train.lr: [0.003, 0.001]\n"
    )
    result = run_cli(
        "train",
        spec,
        "--no-progress",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.sample_tokens=0",
        "--run-dir",
        tmp_path / "sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== sweep point") == 4
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]
    ]
    assert len(children) == 4
    assert {r.data.params["model.positional.kind"] for r in children} == {"learned", "rope"}

    cmp = run_cli("compare", "smoke", "--plot", tmp_path / "cmp.png", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stderr
    header = cmp.stdout.splitlines()[1]
    assert "model.positional.kind" in header and "train.lr" in header
    assert "model.d_model" not in header  # equal in every run, so not shown
    assert cmp.stdout.count("positional=learned") + cmp.stdout.count("kind=learned") >= 1
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert {r.info.run_name for r in children} == {
        f"positional={p} lr={lr}" for p in ("learned", "rope") for lr in ("0.003", "0.001")
    }
    parent = client.get_run(summary["parent_run_id"])
    best = min(r.data.metrics["summary.best_val_loss"] for r in children)
    assert parent.data.metrics["best_val_loss"] == best
    assert parent.info.start_time <= min(r.info.start_time for r in children)
    assert parent.info.end_time >= max(r.info.end_time for r in children)
    # compare only reads; --log keeps the comparison apart from the runs.
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    logged_cmp = run_cli("compare", "smoke", "--log", "--plot", tmp_path / "cmp.png", cwd=tmp_path)
    assert logged_cmp.returncode == 0, logged_cmp.stderr
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    side = client.get_experiment_by_name("smoke-comparisons")
    logged = client.search_runs([side.experiment_id])
    assert logged and any(a.path == "cmp.png" for a in client.list_artifacts(logged[0].info.run_id))


def test_compare_unknown_experiment_is_a_clear_error(tmp_path):
    from mlflow.tracking import MlflowClient

    result = run_cli("compare", "nope", cwd=tmp_path)  # no store here at all: said, none made
    assert result.returncode == 2 and "no MLflow store at" in result.stderr, result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an empty store
    result = run_cli("compare", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow experiment or spec named 'nope'" in result.stderr


def test_fsdp_two_processes_train_checkpoint_and_resume(tmp_path):
    """FSDP2 on CPU (gloo): sharded training matches one process; its checkpoint (gathered to
    full tensors on rank 0) resumes into a sharded model after a real kill and ends where a
    straight run ends."""
    fsdp = ["--set", "train.parallel=fsdp", "--set", "train.max_steps=12"]
    single = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        tmp_path / "one",
        *COMMON,
        "--set",
        "train.max_steps=12",
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr
    straight = torchrun("--run-dir", tmp_path / "straight", *COMMON, *fsdp, cwd=tmp_path)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]
    proc = torchrun("--run-dir", tmp_path / "killed", *COMMON, *fsdp, cwd=tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-000004").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    rest = torchrun("--run-dir", tmp_path / "killed", "--resume", *COMMON, *fsdp, cwd=tmp_path)
    out, err = rest.communicate(timeout=300)
    assert rest.returncode == 0, err[-3000:]
    assert "resuming" in out
    a, b, c = (
        weights(tmp_path / "one"),
        weights(tmp_path / "straight"),
        weights(tmp_path / "killed"),
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow  # the shared smoke run
@pytest.mark.parametrize(("rank", "said"), [("0", True), ("1", False)])
def test_the_resume_note_is_printed_by_the_first_process_only(
    smoke_run, tmp_path, monkeypatch, capsys, rank, said
):
    """Under torchrun every process printed 'resuming ... (newest run of ...)'."""
    import shutil

    from gptkit.cli.train import _resumption

    shutil.copytree(smoke_run, tmp_path / "runs" / "smoke" / "20260101-000000")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", rank)
    _resumption(ROOT / "experiments" / "smoke.yaml", None, [])
    assert ("newest run of 'smoke'" in capsys.readouterr().err) is said
