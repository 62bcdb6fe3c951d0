"""Reliability: determinism, crash-safe checkpoints under real SIGKILL, safe loading, bad input."""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptkit.store.checkpoint import (
    load_checkpoint,
    read_pointer,
    resume_candidates,
    save_checkpoint,
)
from gptkit.testing import tiny_model
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
QUIET = [
    "--no-progress",
    "--set",
    "tracking.enabled=false",
    "--set",
    "train.threads=1",
    "--set",
    "train.max_steps=10",
    "--set",
    "model.dropout=0.1",
]


def test_no_code_path_unpickles_arbitrary_objects():
    calls = []
    for path in (ROOT / "gptkit").rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            calls.append((path.name, m.group(1)))
            assert "weights_only=True" in m.group(1), (path, m.group(0))
        assert "pickle.load" not in text, path
    assert calls, "expected the checkpoint loader's torch.load call"


@pytest.mark.slow
def test_same_spec_and_seed_give_bit_identical_weights_and_text(tmp_path):
    runs = []
    for name in ("a", "b"):
        result = run_cli("train", SMOKE, "--run-dir", tmp_path / name, *QUIET, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs.append(
            load_file(tmp_path / name / "checkpoints" / "step-000010" / "model.safetensors")
        )
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    texts = [
        run_cli("generate", tmp_path / n, "-p", "A", "-n", "30", "--seed", "9").stdout
        for n in ("a", "b")
    ]
    assert texts[0] == texts[1] and len(texts[0]) > 1


WRITER = """
import sys, torch
from gptkit.store.checkpoint import save_checkpoint
from gptkit.testing import tiny_model
from pathlib import Path
model = tiny_model(d_model=256, n_heads=4, n_layers=6, d_ff=1024)
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
opt.step()
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(Path(sys.argv[1]), step, model, {"step": step, "optimizer": opt.state_dict()},
                    {"val_loss": None}, keep_last=2)
    print("saved", step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_valid_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ckpt)], stdout=subprocess.PIPE, text=True
        )
        for line in proc.stdout:
            if line.startswith("saved"):
                break
        time.sleep(random.uniform(0.0, 0.3))  # somewhere inside a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        latest = read_pointer(ckpt / "latest")
        assert latest is not None and (ckpt / latest).is_dir()
        model = tiny_model(d_model=256, n_heads=4, n_layers=6, d_ff=1024)
        state, meta = load_checkpoint(ckpt / latest, model)
        assert state["step"] == meta["step"] == int(latest.split("-")[1])
        assert resume_candidates(ckpt)[0].name == latest
        # The weights are the step's own, not a torn mix of two writes.
        want = _writer_weights(meta["step"])
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, want[name]), f"{latest}: {name} is not the step's"


def _writer_weights(step):
    """The weights WRITER saves at ``step``: its model, one AdamW step, then +1.0 a step."""
    model = tiny_model(d_model=256, n_heads=4, n_layers=6, d_ff=1024)
    opt = torch.optim.AdamW(model.parameters())
    idx = torch.zeros(1, 4, dtype=torch.long)
    model(idx, idx).loss.backward()
    opt.step()
    with torch.no_grad():
        for _ in range(step):
            for p in model.parameters():
                p.add_(1.0)
    return model.state_dict()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 1, model, {"step": 1}, {"val_loss": 2.0}, keep_last=3)
    before = (ckpt / "step-000001" / "model.safetensors").read_bytes()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    try:
        save_checkpoint(ckpt, 2, model, {"step": 2}, {"val_loss": 1.0}, keep_last=3)
    except OSError:
        pass
    else:
        raise AssertionError("the write should have failed")
    assert read_pointer(ckpt / "latest") == "step-000001"
    assert not (ckpt / "step-000002").exists()
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]
    assert (ckpt / "step-000001" / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------- more bad input


@pytest.mark.slow
def test_hundred_megabyte_spec_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB on paper
    assert_user_error(run_cli("validate", big), "104,857,600 bytes", "at most")


@pytest.mark.slow
def test_generate_from_a_run_whose_only_checkpoint_is_truncated(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    for ckpt in (run / "checkpoints").glob("step-*"):
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("generate", run, "-p", "A"), "no usable checkpoint")


@pytest.mark.slow
def test_checkpoint_from_a_different_spec(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    spec = run / "spec.yaml"
    spec.write_text(spec.read_text().replace("d_model: 32", "d_model: 64"))
    assert_user_error(run_cli("generate", run, "-p", "A"), "does not fit this model")


@pytest.mark.slow
def test_export_of_something_that_is_not_a_run(tmp_path, smoke_run):
    assert_user_error(
        run_cli("export", tmp_path, "--out", tmp_path / "b"), "not a gptkit run directory"
    )
    assert_user_error(
        run_cli("export", smoke_run, "--out", tmp_path / "b", "--quantize", "int4"),
        "the only option is int8",
    )
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert_user_error(
        run_cli("export", smoke_run, "--out", tmp_path / "precious"), "refusing to overwrite"
    )
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_bad_flags_and_bad_set_for_generate(smoke_run):
    assert_user_error(run_cli("generate", smoke_run, "--num-samples", "0"), "--num-samples")
    assert_user_error(
        run_cli("generate", smoke_run, "--set", "sampler.p=abc", "--set", "sampler.kind=top_p"),
        "sampler.p",
    )
    assert_user_error(run_cli("train", SMOKE, "--bogus-flag"), "No such option")


@pytest.mark.slow
def test_a_user_error_never_prints_a_traceback_even_for_json_output(tmp_path):
    result = run_cli("eval", tmp_path, "--data", tmp_path / "x.txt", "--json")
    assert_user_error(result, "not a gptkit run directory")
    assert result.stdout == ""  # the error goes to stderr; stdout stays clean for pipes


@pytest.mark.slow
def test_full_disk_during_training_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    """The file-size limit (RLIMIT_FSIZE) makes writes fail as on a full disk, for real."""
    import resource

    run = tmp_path / "run"
    ok = run_cli(
        "train",
        SMOKE,
        "--run-dir",
        run,
        *QUIET,
        "--set",
        "train.eval_every=5",
        "--set",
        "train.max_steps=5",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    before = (run / "checkpoints" / "step-000005" / "model.safetensors").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptkit",
            "train",
            str(SMOKE),
            "--run-dir",
            str(run),
            "--resume",
            *QUIET,
            "--set",
            "train.eval_every=5",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert_user_error(
        result,
        "could not write checkpoint step-000010",
        "the last good checkpoint (step-000005) is intact",
    )
    assert read_pointer(run / "checkpoints" / "latest") == "step-000005"
    assert (run / "checkpoints" / "step-000005" / "model.safetensors").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
