"""Runs and sizes that are damaged or impossible (a hostile-input trial found each): each a
clear message (exit 2 at the command line), never a traceback, never a silent substitute."""

import os
import shutil
from pathlib import Path

import pytest

from gptkit.errors import GptkitError, RunError
from gptkit.spec.files import load_spec
from gptkit.store.checkpoint import read_pointer
from gptkit.store.rundir import RunDir
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli


def test_a_damaged_latest_checkpoint_is_named_when_an_older_one_is_used(smoke_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    latest = read_pointer(copy / "checkpoints" / "latest")
    weights = copy / "checkpoints" / latest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(5000)
    result = run_cli("generate", copy, "-p", "ROMEO:", "-n", "3", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"skipping unusable checkpoint: checkpoint {latest}" in result.stderr or (
        "skipping unusable checkpoint" in result.stderr and latest in result.stderr
    ), result.stderr
    used = result.stderr.split("gptkit: using ")[-1].split()[0]
    assert used.startswith("step-") and used != latest, result.stderr


def test_run_lookup_passes_over_folders_it_may_not_read(smoke_run, tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink("/proc/1/cwd", tmp_path / "sub" / "elsewhere")  # unreadable for most users
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # a link to itself
    shutil.copytree(smoke_run, tmp_path / "a" / "run")
    assert RunDir.latest(tmp_path).path == tmp_path / "a" / "run"


def test_a_run_folder_that_cannot_be_written_is_a_clear_error():
    with pytest.raises(RunError) as info:
        RunDir(Path("/proc/self")).lock()  # exists; no file can be made in it, even by root
    assert "cannot write in the run folder /proc/self" in str(info.value)
    assert not os.path.lexists("/proc/self/.lock")


def test_a_model_larger_than_memory_is_refused_before_anything_is_allocated():
    from gptkit.model import GPT

    model = load_spec(ROOT / "experiments" / "smoke.yaml").model  # d_model 32
    huge = model.model_copy(update={"vocab_size": 3_000_000_000})  # as an edited spec.yaml
    with pytest.raises(GptkitError) as info:
        GPT(huge)  # 9.6e10 parameters: under the spec's bound, over any machine here
    assert info.value.exit_code == 2
    assert "GiB" in str(info.value) and "model.vocab_size 3,000,000,000" in str(info.value)


def test_more_samples_at_once_than_memory_holds_is_a_clear_error(smoke_bundle, tmp_path):
    result = run_cli("generate", smoke_bundle, "-p", "A", "-k", str(10**12), cwd=tmp_path)
    assert_user_error(result, "continuations at once", "--num-samples")


def test_a_run_folder_with_links_is_not_written_through_them(smoke_run, tmp_path):
    """Resuming a run whose files are links (a hostile or careless copy) would append samples
    to, overwrite the plot at and prune checkpoints in the links' targets: refused, exit 2,
    every target as it was."""
    victim = tmp_path / "victim"
    shutil.copytree(smoke_run, victim)
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    for name, target in (
        ("loss_curve.png", victim / "spec.yaml"),
        ("samples.txt", victim / "run.json"),
        ("checkpoints", victim / "checkpoints"),
    ):
        run = tmp_path / name
        shutil.copytree(smoke_run, run)
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
        (run / name).symlink_to(target)
        with pytest.raises(RunError) as caught:
            RunDir(run).lock()
        assert f"holds symbolic links: {name} -> {target}" in str(caught.value)
        assert not (run / ".lock").exists()
    result = run_cli(
        "train", "--resume", "--run-dir", tmp_path / "checkpoints",
        "--set", "train.max_steps=200", "--set", "tracking.enabled=false", cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(result, "holds symbolic links: checkpoints ->", "new --run-dir")
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def test_hand_edited_records_are_passed_over_on_resume(smoke_run, tmp_path):
    """A checkpoint's meta.json whose val_loss is not a number, metrics.jsonl lines whose step
    is not one: resume trains on (they were a TypeError traceback, exit 1, the run FAILED); a
    run.json that is not JSON is said to be written anew (it was replaced silently)."""
    from gptkit.store.checkpoint import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    best = read_pointer(run / "checkpoints" / "best")
    (run / "checkpoints" / best / "meta.json").write_text('{"val_loss": "x", "step": "y"}')
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": "x"}\n{"step": null, "loss": 1}\n{"step": true}\n')
    (run / "run.json").write_text("{not json")  # replaced silently, with what it recorded
    result = run_cli(
        "train", "--resume", "--run-dir", run, "--no-progress",
        "--set", "train.max_steps=30", "--set", "tracking.enabled=false", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "is not valid JSON" in result.stderr and "it is written anew" in result.stderr
    assert read_pointer(run / "checkpoints" / "latest") == "step-000030"
    assert read_pointer(run / "checkpoints" / "best") != best  # its val_loss is unknown now
    assert list_checkpoints(run / "checkpoints")[-1].name == "step-000030"
    steps = [r["step"] for r in RunDir(run).metrics()]
    assert steps == sorted(steps) and steps[-1] == 30


def test_a_run_name_cannot_write_to_the_terminal(smoke_run, tmp_path):
    """A run.json name holding terminal escapes (retitle the window, recolour what follows)
    or rich markup is listed as written, the control characters shown as \\x1b."""
    import json

    run = tmp_path / "runs" / "smoke" / "x"
    shutil.copytree(smoke_run, run)
    info = json.loads((run / "run.json").read_text())
    info["name"] = "evil\x1b]0;pwned\x07\x1b[31m[bold]red"
    (run / "run.json").write_text(json.dumps(info))
    listed = run_cli("runs", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "evil\\x1b]0;pwned\\x07\\x1b[31m[bold]red" in listed.stdout.replace("\n", ""), (
        listed.stdout
    )


def test_weights_that_are_not_finite_or_a_dangling_latest_are_named(smoke_run, tmp_path):
    """A latest checkpoint whose weights hold NaN is skipped with a warning (it generated
    newlines, exit 0), and a ``latest`` naming a folder that is gone says so before an older
    one is used (it was used silently)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    latest = read_pointer(run / "checkpoints" / "latest")
    weights = run / "checkpoints" / latest / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, weights)
    result = run_cli("generate", run, "-p", "ROMEO:", "-n", "3", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "weights that are not finite (NaN or inf)" in result.stderr and latest in result.stderr
    assert "gptkit: using step-" in result.stderr, result.stderr
    shutil.rmtree(run / "checkpoints" / latest)
    result = run_cli("generate", run, "-p", "ROMEO:", "-n", "3", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"latest names {latest}, which is not a complete checkpoint" in result.stderr


def test_numbers_too_large_for_a_float_in_run_files_are_not_numbers(tmp_path):
    """An integer of 400 digits (valid JSON, under the digit limit) as a val_loss, a created
    time or a training-state count: math.isfinite raised OverflowError (a traceback)."""
    import json

    from gptkit.store.checkpoint import _val_loss
    from gptkit.training.state import _get

    huge = 10**400
    assert _val_loss({"val_loss": huge}) is None and _val_loss({"val_loss": 2}) == 2.0
    run = RunDir(tmp_path)
    run.run_file.write_text(json.dumps({"name": "x", "created": huge}))
    with pytest.raises(RunError, match="created is not a time"):
        run.read_info()
    with pytest.raises(RunError, match="'step' should be a number"):
        _get({"step": huge}, "step", int, "state")


def test_weights_of_an_integer_type_are_skipped_not_cast(smoke_run, tmp_path):
    """A checkpoint whose weights were written as integers: loaded, they were cast into the
    float parameters (mostly zeros); generate and export went on with them, parity included.
    Now skipped with a warning naming the tensor and its type, as NaN weights are."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    latest = read_pointer(run / "checkpoints" / "latest")
    weights = run / "checkpoints" / latest / "model.safetensors"
    tensors = {k: v.to(torch.int64) for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    result = run_cli("generate", run, "-p", "ROMEO:", "-n", "3", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "are not floating point" in result.stderr and "I64" in result.stderr, result.stderr
    assert "gptkit: using step-" in result.stderr, result.stderr
