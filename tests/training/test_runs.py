"""The run contract: finding runs (newest by creation time), `gptkit runs`, the MLflow record
(real times, bundles under their own names, compare adds nothing), live progress on a real
terminal, and the shape of gptkit/training/."""

import ast
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.helpers import run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
FAST = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.eval_every=2",
    "--set",
    "train.sample_tokens=0",
    "--set",
    "tracking.enabled=false",
    "--no-progress",
]


@pytest.mark.slow
def test_runs_resolve_to_the_newest_by_creation_time_everywhere(tmp_path):
    first = run_cli("train", SMOKE, "--run-dir", "runs/smoke/try", *FAST, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    time.sleep(1.1)  # a distinct timestamp folder
    second = run_cli("train", SMOKE, *FAST, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    newer = second.stdout.split("run: ")[-1].strip()
    assert newer.startswith("runs/smoke/2") and newer < "runs/smoke/try"  # sorts first by name

    resumed = run_cli("train", SMOKE, "--resume", *FAST, "--set", "train.max_steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {newer}" in resumed.stderr + resumed.stdout
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    for args in (
        ["generate", "runs/smoke", "--prompt", "ROMEO:", "-n", "5"],
        ["eval", "runs/smoke", "--data", text],
        ["export", "runs/smoke", "--out", tmp_path / "bundle"],
    ):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert f"using {newer}" in result.stderr, (args, result.stderr)

    listed = run_cli("runs", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["folder"] for r in rows] == [newer, "runs/smoke/try"]
    assert rows[0]["steps"] == 6 and rows[0]["status"] == "FINISHED"
    assert rows[0]["name"] == "smoke max_steps=4 eval_every=2 sample_tokens=0 enabled=false"
    assert rows[1]["best_val_loss"] is not None and rows[1]["wall_time_s"] > 0


@pytest.mark.slow
def test_sweep_folder_resolves_to_its_newest_point(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SMOKE.read_text() + "sweep: {model.positional: [learned, rope]}\n")
    result = run_cli("train", spec, *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    gen = run_cli("generate", "runs/smoke", "--prompt", "A", "-n", "3", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert re.search(r"using runs/smoke/sweep-[0-9-]+/02-positional-rope", gen.stderr), gen.stderr


@pytest.mark.slow
def test_mlflow_record_tells_the_truth(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [SMOKE, "--run-dir", tmp_path / "run", "--no-progress", "--name", "truth"]
    sets = [f"tracking.uri={db}", "train.max_steps=30", "train.eval_every=10"]
    for item in sets:
        args += ["--set", item]
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "train", *map(str, args)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = [(time.time(), line) for line in proc.stdout]  # each line with when it came
    assert proc.wait(timeout=600) == 0, "".join(line for _, line in lines)
    exited = time.time()
    output = "".join(line for _, line in lines)
    header = next(t for t, line in lines if line.startswith("run "))  # printed before step 1
    last_step = next(t for t, line in lines if line.startswith("step     30/30"))
    client = MlflowClient(db)
    link = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    run = client.get_run(link["run_id"])
    # The record spans the command: it starts when the command started (before the model
    # was built), and ends after the last step, before the process exited. Line times carry
    # pipe latency, hence the small slack; the clocks are the same machine's.
    start, end = run.info.start_time / 1000, run.info.end_time / 1000
    assert t0 - 0.01 <= start <= header, (t0, start, header)
    assert last_step - 0.5 <= end <= exited, (last_step, end, exited)
    assert run.info.run_name == "truth"
    assert "/model-metrics" in output  # the run's URL is printed
    params = run.data.params
    assert params["tracking.uri"] == db and params["train.device"] == "cpu"
    assert "train.parallel" not in params  # one process: DDP/FSDP did not apply
    assert "null" not in params.values()
    metrics = run.data.metrics
    for key in (
        "summary.best_val_loss",
        "summary.final_val_loss",
        "summary.total_tokens",
        "summary.wall_time_s",
        "summary.tokens_per_sec",
    ):
        assert key in metrics, key
    assert metrics["summary.total_tokens"] == 30 * 8 * 32
    assert (
        run.inputs.dataset_inputs
        and run.inputs.dataset_inputs[0].dataset.source == "tinyshakespeare"
    )
    assert "gptkit train" in run.data.tags["mlflow.note.content"]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"

    end = run.info.end_time
    for extra in ([], ["--quantize", "int8"]):
        out = run_cli(
            "export", tmp_path / "run", "--out", tmp_path / f"b{len(extra)}", *extra, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
    after = client.get_run(link["run_id"])
    assert after.info.end_time == end and after.info.status == "FINISHED"
    bundles = {a.path for a in client.list_artifacts(link["run_id"], "bundles")}
    assert bundles == {"bundles/onnx-fp32", "bundles/onnx-int8"}

    n_runs = len(client.search_runs([run.info.experiment_id]))
    cmp = run_cli(
        "compare", "smoke", "--tracking-uri", db, "--plot", tmp_path / "c.png", cwd=tmp_path
    )
    assert cmp.returncode == 0, cmp.stderr
    assert len(client.search_runs([run.info.experiment_id])) == n_runs


@pytest.mark.slow
def test_progress_on_a_real_terminal_shows_loss_lr_rate_and_one_eta(tmp_path):
    cmd = (
        f"{sys.executable} -m gptkit train {SMOKE} --set train.max_steps=60 "
        "--set train.log_every=30 --set train.eval_every=30 --set tracking.enabled=false "
        "--set train.sample_tokens=20"
    )
    screen = subprocess.run(
        ["script", "-qfec", cmd, "/dev/null"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "COLUMNS": "160"},
    )
    assert screen.returncode == 0, screen.stdout[-2000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.stdout)
    frames = [f for f in re.split(r"[\r\n]", text) if re.search(r"\b\d+/60\b", f)]
    between = [f for f in frames if (m := re.search(r"\b(\d+)/60\b", f)) and int(m[1]) % 30]
    assert between, text[-2000:]
    for frame in between:
        assert "loss" in frame and "lr" in frame and "tok/s" in frame, frame
        assert frame.count("eta") == 1 and "-:--:--" not in frame, frame
    zero = [f for f in frames if re.search(r"\b0/60\b", f)]
    assert zero and all("waiting for the first step" in f for f in zero), text[
        :1500
    ]  # a word, not a bare 0/60
    assert "step 30: val loss" in text  # the eval line stays in the scrollback
    sample_lines = [line for line in text.splitlines() if "sample:" in line]
    assert sample_lines and all("⏎" in s or len(s) < 200 for s in sample_lines)


def test_training_package_shape():
    """gptkit/store/rundir.py holds RunDir, the only place that spells the run folder's
    layout; gptkit/training/ holds TrainState; both keep short functions."""
    from gptkit.store.rundir import RunDir  # noqa: F401
    from gptkit.training.state import TrainState  # noqa: F401

    for path in [*(ROOT / "gptkit" / "training").glob("*.py"), ROOT / "gptkit/store/rundir.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.name} is {length} lines"
    layout = re.compile(
        r"""["'](spec\.yaml|run\.json|metrics\.jsonl|samples\.txt|mlflow\.json|"""
        r"""mlflow-spool\.jsonl|plugins\.json|loss_curve\.png)["']|/\s*["']checkpoints["']"""
    )
    offenders = [
        f"{p.relative_to(ROOT)}: {m[0]}"
        for p in (ROOT / "gptkit").rglob("*.py")
        if p.name != "rundir.py"
        for m in [layout.search(p.read_text())]
        if m
    ]
    assert offenders == []
