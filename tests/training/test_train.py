"""Training: the run directory, schedules, checkpoints, exact resume after a real kill."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptkit.spec.validate import validate_spec
from gptkit.store.checkpoint import read_pointer
from gptkit.training.loop import lr_at
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
# Small, single-threaded (bit-exact across processes), no tracking, a checkpoint every 5 steps.
EXACT = [
    "--set",
    "train.max_steps=40",
    "--set",
    "train.eval_every=5",
    "--set",
    "train.log_every=1",
    "--set",
    "train.threads=1",
    "--set",
    "tracking.enabled=false",
    "--set",
    "model.dropout=0.1",
    "--set",
    "train.sample_tokens=0",
    "--no-progress",
]


def final_weights(run_dir):
    name = read_pointer(run_dir / "checkpoints" / "latest")
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


@pytest.mark.slow
def test_run_directory_layout(smoke_run):
    for name in (
        "spec.yaml",
        "tokenizer/tokenizer.gptkit.json",
        "metrics.jsonl",
        "samples.txt",
        "mlflow.json",
        "loss_curve.png",
        "checkpoints/latest",
        "checkpoints/best",
    ):
        assert (smoke_run / name).exists(), name
    latest = read_pointer(smoke_run / "checkpoints" / "latest")
    assert latest == "step-000020"
    for f in ("model.safetensors", "state.pt", "meta.json"):
        assert (smoke_run / "checkpoints" / latest / f).is_file()
    state = torch.load(smoke_run / "checkpoints" / latest / "state.pt", weights_only=True)
    assert state["step"] == 20
    rows = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]  # it learns something in 20 steps
    assert all(
        {"train_loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        for r in rows
        if "train_loss" in r
    )


def test_schedule_warmup_then_cosine_to_min():
    t = validate_spec(
        {"train": {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}}
    ).train
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    const = t.model_copy(update={"schedule": "constant"})
    assert lr_at(80, const) == 1.0
    lin = t.model_copy(update={"schedule": "linear"})
    assert lr_at(60, lin) == pytest.approx(0.55)


def _train(run_dir, *extra, cwd):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptkit",
            "train",
            str(SMOKE),
            "--run-dir",
            str(run_dir),
            *EXACT,
            *extra,
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith("step") and f"{step:>6}/" in line:
            return
    raise AssertionError(f"never reached step {step}: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    proc = _train(work / "run", cwd=work)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return work / "run"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference_run):
    kill_at = random.Random().randint(6, 38)
    proc = _train(tmp_path / "run", cwd=tmp_path)
    _wait_for_step(proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli(
        "train", SMOKE, "--run-dir", tmp_path / "run", "--resume", *EXACT, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = final_weights(reference_run), final_weights(tmp_path / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a kill at step {kill_at}"
    # The log holds each step once, as if the run had never stopped.
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "train_loss" in x
    ]
    assert steps == list(range(1, 41))


def _checkpointed_and_resumes_exactly(tmp_path, err, reason, reference_run):
    """The step the run said it stopped at (``stopped by REASON at step N``) has a
    checkpoint, and resuming from it ends with the reference run's weights, bit for bit.
    Returns the step."""
    step = int(err.split(f"stopped by {reason} at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "model.safetensors").exists()
    resumed = run_cli(
        "train", SMOKE, "--run-dir", tmp_path / "run", "--resume", *EXACT, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(reference_run), final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return step


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path, reference_run):
    proc = _train(tmp_path / "run", cwd=tmp_path)
    _wait_for_step(proc, 7)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by SIGINT at step" in err
    _checkpointed_and_resumes_exactly(tmp_path, err, "SIGINT", reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGHUP", "output closed"])
def test_a_closed_terminal_or_output_stops_with_a_checkpoint(tmp_path, reference_run, how):
    """A closed terminal (SIGHUP) or a reader of its output that went away (``| head``)
    stops the run as Ctrl-C does: a checkpoint at the step reached, the reason on stderr,
    exit 130, and a resume bit-identical to a run never stopped (it died at once, FAILED,
    with no checkpoint)."""
    proc = _train(tmp_path / "run", cwd=tmp_path)
    _wait_for_step(proc, 7)
    if how == "SIGHUP":
        proc.send_signal(signal.SIGHUP)
    else:
        proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    reason = "SIGHUP" if how == "SIGHUP" else "its output closing"
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"stopped by {reason} at step" in err, err
    info = json.loads((tmp_path / "run" / "run.json").read_text())  # before the resume
    step = _checkpointed_and_resumes_exactly(tmp_path, err, reason, reference_run)
    assert step < 40
    assert info["status"] == "KILLED" and info["summary"]["steps"] == step


@pytest.mark.slow
def test_a_closed_output_under_the_live_bar_stops_with_a_checkpoint(tmp_path):
    """On a terminal (stderr a tty: the live bar), ``gptkit train ... | head -1``: rich turns
    the broken pipe into SystemExit(1), which ended the run FAILED with no checkpoint."""
    import pty

    leader, follower = pty.openpty()
    args = [a for a in EXACT if a != "--no-progress"]
    args[args.index("train.max_steps=40")] = "train.max_steps=400"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "train", str(SMOKE), "--run-dir", "run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    proc.stdout.readline()  # the run's first line, then the reader goes away
    proc.stdout.close()
    err = b""
    while True:  # the terminal's side: read until the process closes it
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    proc.wait(timeout=120)
    os.close(leader)
    text = err.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "stopped by its output closing at step" in text, text
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "KILLED"
    step = info["summary"]["steps"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "model.safetensors").exists()


@pytest.mark.slow
def test_resume_falls_back_when_the_latest_checkpoint_is_corrupt(tmp_path, reference_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    latest = run / "checkpoints" / read_pointer(run / "checkpoints" / "latest")
    (latest / "model.safetensors").write_bytes(b"truncated")
    result = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        "train.max_steps=40",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "skipping unusable checkpoint" in result.stderr
    a, b = final_weights(reference_run), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # retrained the last 5 steps exactly


@pytest.mark.slow
def test_resume_refuses_a_different_model_but_allows_more_steps(tmp_path, reference_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    bad = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        "model.d_model=64",
        cwd=tmp_path,
    )
    assert_user_error(bad, "cannot resume", "model.d_model: 32 in the run, 64 now")
    more = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        "train.max_steps=45",
        cwd=tmp_path,
    )
    assert more.returncode == 0, more.stderr
    assert read_pointer(run / "checkpoints" / "latest") == "step-000045"


@pytest.mark.slow
def test_nothing_to_resume_and_existing_run_dir(tmp_path, reference_run):
    assert_user_error(
        run_cli("train", SMOKE, "--resume", *EXACT, cwd=tmp_path), "nothing to resume"
    )
    assert_user_error(  # it said "not a gptkit run (no spec.yaml)" of a folder that is not there
        run_cli("train", "--resume", "--run-dir", tmp_path / "runs" / "nope", cwd=tmp_path),
        "nothing to resume: ",
        "runs/nope does not exist",
    )
    assert_user_error(
        run_cli("train", SMOKE, "--run-dir", reference_run, *EXACT, cwd=tmp_path),
        "already holds a run",
        "--resume",
    )


@pytest.mark.slow
def test_diverging_loss_stops_with_step_and_checkpoint(tmp_path):
    result = run_cli(
        "train",
        SMOKE,
        "--no-progress",
        "--set",
        "train.lr=1e30",
        "--set",
        "train.grad_clip=null",
        "--set",
        "tracking.enabled=false",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "training stopped at step 6: 5 non-finite steps in a row" in result.stderr
    assert "last good checkpoint" in result.stderr


@pytest.mark.slow
def test_pickle_payload_in_a_checkpoint_is_refused_without_running_it(tmp_path, reference_run):
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for ckpt in (run / "checkpoints").glob("step-*"):
        with open(ckpt / "state.pt", "wb") as f:
            pickle.dump({"step": Payload()}, f)
    result = run_cli("train", SMOKE, "--run-dir", run, "--resume", *EXACT, cwd=tmp_path)
    assert_user_error(result, "refusing state.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_eval_command(smoke_run, tmp_path):
    text = tmp_path / "t.txt"
    sample = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text.write_text(sample.read_text()[:2000] if sample.exists() else "To be, or not to be. " * 50)
    result = run_cli("eval", smoke_run, "--data", text, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["tokens"] == doc["bytes"] - 1  # char-level: every char but the first is predicted
    assert 1.0 < doc["loss"] < 5.0
    import math

    assert doc["perplexity"] == pytest.approx(math.exp(doc["loss"]))
    assert doc["bits_per_byte"] == pytest.approx(
        doc["loss"] * doc["tokens"] / doc["bytes"] / math.log(2)
    )
    assert_user_error(
        run_cli("eval", tmp_path / "missing", "--data", text), "bundle or run not found"
    )
    assert_user_error(run_cli("eval", tmp_path, "--data", text), "not a gptkit run directory")
    globbed = run_cli("eval", smoke_run, "--data", str(text.parent / "*.txt"), "--json")
    assert globbed.returncode == 0, globbed.stderr  # a glob is a source too
    assert json.loads(globbed.stdout)["tokens"] == doc["tokens"]
    missing = run_cli("eval", smoke_run, "--data", tmp_path / "my_text.txt")
    assert_user_error(missing, "my_text.txt: no such file to score", "--data")
    assert "data.source" not in missing.stderr


@pytest.mark.slow
def test_eval_scores_a_bundle_on_onnxruntime_as_its_run_on_torch(smoke_run, smoke_bundle, tmp_path):
    """``gptkit eval RUN_OR_BUNDLE --data FILE`` (the contract): the bundle scored on
    onnxruntime, with torch unimportable, gives the run's figures; with no file it says a
    bundle holds no validation split."""
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler. " * 8)
    ran = run_cli("eval", smoke_run, "--data", text, "--json")
    assert ran.returncode == 0, ran.stderr
    code = "import sys; sys.modules['torch'] = None\nfrom gptkit.cli import main; main()"
    bundled = subprocess.run(
        [sys.executable, "-c", code, "eval", str(smoke_bundle), "--data", str(text), "--json",
         "--batch-size", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bundled.returncode == 0, bundled.stderr
    run_doc, bundle_doc = json.loads(ran.stdout), json.loads(bundled.stdout)
    assert bundle_doc["tokens"] == run_doc["tokens"] and bundle_doc["bytes"] == run_doc["bytes"]
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert bundle_doc[key] == pytest.approx(run_doc[key], rel=1e-5), key
    assert_user_error(run_cli("eval", smoke_bundle), "holds no validation split", "--data FILE")


@pytest.mark.slow
def test_the_printed_hint_resumes_exactly_what_was_asked(tmp_path, reference_run):
    """Started with --set overrides, interrupted, resumed by running the hint as printed (no
    --set): it ends at the overridden step with the uninterrupted run's weights, and its MLflow
    params and stored spec still say what was asked."""
    import shlex

    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _train(
        tmp_path / "run",
        "--set",
        "tracking.enabled=true",
        "--set",
        f"tracking.uri={db}",
        cwd=tmp_path,
    )
    _wait_for_step(proc, 7)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    hint = err.split("Continue with: ")[1].strip()
    argv = shlex.split(hint)
    assert argv[:2] == ["gptkit", "train"] and "--set" not in argv
    resumed = subprocess.run(
        [sys.executable, "-m", "gptkit", *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert read_pointer(tmp_path / "run" / "checkpoints" / "latest") == "step-000040"
    a, b = final_weights(reference_run), final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    run = MlflowClient(db).get_run(run_id)
    assert run.data.params["train.max_steps"] == "40"
    assert run.data.params["model.dropout"] == "0.1"
    assert run.info.status == "FINISHED"
    assert any(k.startswith("gptkit.resumed_at.") for k in run.data.tags)
    assert "max_steps: 40" in (tmp_path / "run" / "spec.yaml").read_text()


@pytest.mark.slow
def test_resume_with_a_changed_field_lists_it_and_the_edited_spec_file_is_not_applied(
    tmp_path, reference_run
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    edited = tmp_path / "edited.yaml"
    edited.write_text(SMOKE.read_text().replace("lr: 3.0e-3", "lr: 1.0e-2"))
    result = run_cli(
        "train",
        edited,
        "--run-dir",
        run,
        "--resume",
        "--no-progress",
        "--set",
        "train.max_steps=42",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "resume changes train.max_steps: 40 -> 42" in result.stdout
    assert "train.lr" in result.stderr and "not applied" in result.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["resumes"][-1]["changes"] == {"train.max_steps": [40, 42]}
    assert "lr: 0.003" in (run / "spec.yaml").read_text()


@pytest.mark.slow
def test_a_non_run_folder_is_not_written_into(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = run_cli("train", SMOKE, "--run-dir", folder, *EXACT, cwd=tmp_path)
    assert_user_error(result, "is not a gptkit run", "refusing to write")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.slow  # two CLI processes
@pytest.mark.parametrize("state", ["starting", "with its spec"])
def test_a_second_training_into_a_folder_being_written_says_so(tmp_path, state):
    """The second of two trainings started into one --run-dir was told the folder 'is not a
    gptkit run' (the first had not written spec.yaml yet) or 'already holds a run. Add
    --resume'; neither is what is happening."""
    import subprocess
    import sys

    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".lock").write_text(f"{holder.pid}\n")
        (folder / "metrics.jsonl").write_text("")
        if state == "with its spec":
            (folder / "spec.yaml").write_text("name: smoke\n")
        result = run_cli("train", SMOKE, "--run-dir", folder, *EXACT, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, f"is being written by another gptkit process (pid {holder.pid})")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, reference_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    first = _train(run, "--resume", "--set", "train.max_steps=400", cwd=tmp_path)
    _wait_for_step(first, 42)
    second = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        "train.max_steps=400",
        cwd=tmp_path,
    )
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert_user_error(second, "is being written by another gptkit process")
    # The first one died without cleaning up: its stale lock is explained and taken over.
    third = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        "train.max_steps=45",
        cwd=tmp_path,
    )
    assert third.returncode == 0, third.stderr
    assert "left by a process that is gone" in third.stderr


@pytest.mark.slow
def test_resume_that_would_change_the_tokenizer_is_refused_and_changes_nothing(
    tmp_path, reference_run
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other.txt"
    # A different character set: a char tokenizer fitted on it is another mapping.
    other.write_text("".join(chr(c) for c in range(0x3B1, 0x3B1 + 20)) * 2000)
    result = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        "--resume",
        *EXACT,
        "--set",
        f"data.source={other}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot resume" in result.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_a_run_that_ends_on_non_finite_steps_fails_and_names_the_checkpoint(tmp_path):
    # Steps 1-3 are fine; from step 4 on the learning rate is huge and the loss blows up, with
    # max_bad_steps larger than what is left: the run reaches max_steps on skipped steps.
    result = run_cli(
        "train",
        SMOKE,
        "--no-progress",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.lr=1e25",
        "--set",
        "train.grad_clip=null",
        "--set",
        "train.max_bad_steps=50",
        "--set",
        "tracking.enabled=false",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.sample_tokens=0",
        cwd=tmp_path,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "non-finite step(s)" in result.stderr and "checkpoints/step-" in result.stderr


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """``--resume --checkpoint step-N`` (or ``best``) continues from that checkpoint; the newer
    ones are kept aside, not deleted, and training from step N again gives them back exactly."""
    sets = ["train.max_steps=6", "train.eval_every=2", "train.sample_tokens=0", "train.keep_last=5"]
    args = [x for s in [*sets, "tracking.enabled=false"] for x in ("--set", s)]
    first = run_cli("train", SMOKE, "--no-progress", "--run-dir", "run", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    again = run_cli(
        "train", "--resume", "--run-dir", "run", "--checkpoint", "step-000002", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert "from step-000002 (step 2)" in again.stdout and "done: 4 steps" in again.stdout
    (aside,) = ckpts.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000004", "step-000006"]
    weights = "model.safetensors"
    assert (ckpts / "step-000006" / weights).read_bytes() == (
        aside / "step-000006" / weights
    ).read_bytes()
    best = run_cli(
        "train",
        "--resume",
        "--run-dir",
        "run",
        "--checkpoint",
        "best",
        "--set",
        "train.max_steps=8",
        cwd=tmp_path,
    )
    assert best.returncode == 0, best.stderr
    assert (ckpts / "latest").read_text().strip() == "step-000008"
    assert_user_error(
        run_cli("train", SMOKE, "--checkpoint", "best", cwd=tmp_path), "--checkpoint goes with"
    )


def test_a_training_step_copies_to_the_host_once(tmp_path, monkeypatch):
    """A step's micro-batch losses and gradient norm come to the host in one copy (on a GPU
    each ``.item()`` waits for all the work queued before it), and the loss it reports is the
    sum of the micro-batches' losses as before."""
    import sys
    from pathlib import Path

    import torch

    from gptkit.spec.files import load_spec
    from gptkit.training.loop import SpecTrainer

    spec = load_spec(
        SMOKE,
        [
            "train.max_steps=3",
            "train.grad_accum_steps=3",
            "train.eval_every=100",
            "train.sample_tokens=0",
            "tracking.enabled=false",
        ],
    )
    copies, inside, reported = [], [False], []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            # gptkit's own copies (torch's CPU AdamW reads its step counters with .item())
            if inside[0] and "gptkit" in Path(sys._getframe(1).f_code.co_filename).parts:
                copies.append(self.numel())
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = SpecTrainer._train_step

    def watched(self, lr):
        inside[0] = True
        try:
            reported.append(step(self, lr))
        finally:
            inside[0] = False
        return reported[-1]

    monkeypatch.setattr(SpecTrainer, "_train_step", watched)
    SpecTrainer(spec, run_dir=tmp_path / "run", progress=False).run()
    assert copies == [4, 4, 4]  # three steps: 3 losses and the norm, together
    assert all(loss > 0 and norm > 0 for loss, norm in reported)
