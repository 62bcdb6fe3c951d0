"""A catalogue of damaged runs: every file of a real run, corrupted in several ways, opened by
the commands that open runs. Each ends with exit 2 and a one-paragraph message (or, where the
damage is harmless, works), never a traceback; pointers never lead out of the run; a damaged
MLflow spool never blocks tracking."""

import json
import shutil

import pytest
import torch

from gptkit.cli import main
from tests.conftest import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"


def cli(capsys, *args):
    """Run the CLI in this process: (exit code, stderr). Anything but a clean exit raises."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    err = capsys.readouterr().err
    return code, err


def _save(obj):
    def damage(path):
        torch.save(obj, path)

    return damage


def _write(data: bytes):
    def damage(path):
        path.write_bytes(data)

    return damage


# (file inside the run, name, damage, what `generate` must do: "error" or "ok")
STATE = "checkpoints/*/state.pt"
CATALOGUE = [
    ("spec.yaml", "empty", _write(b""), "error"),
    ("spec.yaml", "not yaml", _write(b"model: [unclosed"), "error"),
    ("spec.yaml", "a list", _write(b"- 1\n- 2\n"), "error"),
    (
        "spec.yaml",
        "wrong model",
        _write(SMOKE.read_bytes().replace(b"d_model: 32", b"d_model: 64")),
        "error",
    ),
    ("run.json", "garbage", _write(b"\x00\xffnot json"), "ok"),
    ("run.json", "a number", _write(b"42"), "ok"),
    ("mlflow.json", "garbage", _write(b"{"), "ok"),
    ("tokenizer/tokenizer.gptkit.json", "garbage", _write(b"\x00\x01"), "error"),
    (
        "tokenizer/tokenizer.gptkit.json",
        "wrong types",
        _write(b'{"kind": 5, "state": []}'),
        "error",
    ),
    ("checkpoints/latest", "absolute path", _write(b"/etc\n"), "ok"),
    ("checkpoints/latest", "escapes the run", _write(b"../../../x\n"), "ok"),
    ("checkpoints/*/model.safetensors", "truncated", _write(b"\x10\x00\x00"), "error"),
    ("checkpoints/*/model.safetensors", "emptied", _write(b""), "error"),
    ("checkpoints/*/meta.json", "garbage", _write(b"[[["), "ok"),
    (STATE, "garbage bytes", _write(b"not a torch file"), "error"),
]


@pytest.fixture(scope="module")
def run_copy_source(smoke_run):
    return smoke_run


def _damaged(source, tmp_path, pattern, damage):
    run = tmp_path / "run"
    shutil.copytree(source, run)
    targets = sorted(run.glob(pattern))
    assert targets, pattern
    for target in targets:
        damage(target)
    return run


@pytest.mark.parametrize(
    "pattern,name,damage,expect",
    CATALOGUE,
    ids=[f"{c[0].split('/')[-1]}-{c[1]}" for c in CATALOGUE],
)
def test_generate_from_a_damaged_run(smoke_run, tmp_path, capsys, pattern, name, damage, expect):
    run = _damaged(smoke_run, tmp_path, pattern, damage)
    code, err = cli(capsys, "generate", run, "-p", "A", "-n", "3", "--seed", "1")
    assert "Traceback" not in err
    if expect == "ok":
        assert code == 0, err
    else:
        assert code == 2, err
        assert err.startswith("gptkit: error: ") and str(run) in err, err


RESUME_STATES = [
    ("empty dict", {}, "has no 'step'"),
    ("step a string", {"step": "x"}, "'step' should be a number"),
    ("negative step", {"step": -3}, "negative"),
    (
        "rng of the wrong type",
        {"step": 5, "data_rng": torch.zeros(3, dtype=torch.float32)},
        "data_rng",
    ),
    (
        "garbage optimizer",
        {"step": 5, "optimizer": {"state": 5, "param_groups": "x"}, "optimizer_format": "local"},
        "optimizer state",
    ),
    ("a list", [1, 2, 3], "not a dict"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,state,needle", RESUME_STATES, ids=[s[0] for s in RESUME_STATES])
def test_resume_from_a_damaged_training_state(smoke_run, tmp_path, capsys, name, state, needle):
    run = _damaged(smoke_run, tmp_path, STATE, _save(state))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = cli(
        capsys,
        "train",
        "--resume",
        "--run-dir",
        run,
        "--no-progress",
        "--set",
        "tracking.enabled=false",
    )
    assert code == 2, err
    assert "Traceback" not in err and needle in err, err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # a refused resume changes nothing


def test_pointer_outside_the_run_is_never_followed(smoke_run, tmp_path):
    from gptkit.store.checkpoint import checkpoint_candidates, read_pointer

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoints" / "step-000020", outside)
    for target in (str(outside), f"../../{outside.name}", "step-000020/../../outside"):
        (run / "checkpoints" / "latest").write_text(target)
        assert read_pointer(run / "checkpoints" / "latest") is None
        assert all(
            c.parent == run / "checkpoints" for c in checkpoint_candidates(run / "checkpoints")
        )
    (run / "checkpoints" / "best").write_text(str(outside))
    assert checkpoint_candidates(run / "checkpoints", "best") == []


def test_sweep_grid_too_large_is_refused_before_anything_is_built(tmp_path, capsys):
    spec = tmp_path / "huge.yaml"
    values = list(range(200))
    spec.write_text(
        SMOKE.read_text() + f"sweep: {{train.lr: {values}, seed: {values}, "
        f"train.warmup_steps: {values}}}\n"
    )
    code, err = cli(capsys, "train", spec, "--no-progress")
    assert code == 2 and "8,000,000 points" in err and "Traceback" not in err


class _Refuses(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_damaged_spool_lines_are_set_aside_and_the_rest_is_sent(tmp_path):
    from mlflow.tracking import MlflowClient

    from gptkit.training.tracking import Tracker

    run = tmp_path / "run"
    run.mkdir()
    good = {"op": "metrics", "metrics": {"val_loss": 1.5}, "step": 3, "ts": 1}
    (run / "mlflow-spool.jsonl").write_text(
        '42\n[1, 2]\n{"op": "bogus"}\n' + json.dumps(good) + '\n{"op": "metr'
    )
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    warnings = []
    tracker = Tracker(uri, "spool", run, "r", warn=warnings.append)
    assert tracker.close() == 0
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    history = MlflowClient(uri).get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]
    rejected = (run / "mlflow-spool.jsonl.rejected").read_text().splitlines()
    assert len(rejected) == 4  # the number, the list, the unknown op, the cut-off line
    assert sum("set aside" in w or "refused" in w for w in warnings) == 1
    assert not (run / "mlflow-spool.jsonl").exists()


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_an_event_mlflow_refuses_for_good_does_not_block_the_others(tmp_path):
    from mlflow.tracking import MlflowClient

    from gptkit.training.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri, "refuse", tmp_path, "r", warn=lambda m: None)
    tracker.log_params({"a": "1"})
    tracker.log_params({"a": "2"})  # MLflow params are immutable: refused for good
    tracker.log_metrics({"loss": 2.0}, 1)
    assert tracker.close() == 0
    run_id = json.loads((tmp_path / "mlflow.json").read_text())["run_id"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"loss": 2.0}
    assert (tmp_path / "mlflow-spool.jsonl.rejected").exists()


def test_compare_and_export_fail_fast_on_an_unreachable_server(smoke_run, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    code, err = cli(capsys, "compare", "smoke", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert code == 2 and "cannot read MLflow" in err and "Traceback" not in err
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "mlflow.json").write_text(
        json.dumps({"uri": f"http://127.0.0.1:{port}", "run_id": "0" * 32})
    )
    code, err = cli(capsys, "export", run, "--out", tmp_path / "bundle")
    assert code == 0 and "Traceback" not in err
    assert time.time() - t0 < 120  # seconds, not the minutes of MLflow's default retries
