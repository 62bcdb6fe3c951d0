"""Sweeps that can be interrupted: Ctrl-C (SIGINT) or ``kill -9`` in the middle of a point, then
the printed command continues the sweep. Finished points are kept, the interrupted one resumes
from its checkpoint, the rest run, and the end is the same as a sweep that never stopped; the
MLflow parent says KILLED (with an end time) while stopped and FINISHED at the end. Real
subprocesses, real signals, a real MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
SPEC = (
    f"extends: {SMOKE}\nname: sw\n"
    "train: {max_steps: 60, eval_every: 20, checkpoint_every: 10, eval_batches: 2,"
    " sample_tokens: 0, log_every: 10, warmup_steps: 2, threads: 1}\n"
    "sweep: {train.lr: [0.003, 0.001]}\nrepeats: 2\n"
)


def write_spec(folder):
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "sw.yaml"
    spec.write_text(SPEC)
    return spec


def client_for(folder):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def finals(sweep):
    state = json.loads((sweep / "sweep.json").read_text())
    return state, [(p["point"], p["val_loss"], p["best_val_loss"]) for p in state["points"]]


def live_runs(folder):
    client = client_for(folder)
    exp = client.get_experiment_by_name("smoke")  # extends smoke.yaml: its experiment
    return client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same sweep, never interrupted."""
    work = tmp_path_factory.mktemp("sweep-ref")
    result = run_cli("train", write_spec(work), "--no-progress", "--run-dir", "sweep", cwd=work)
    assert result.returncode == 0, result.stderr
    return finals(work / "sweep")[1]


def start_and_stop(work, sig):
    """Start the sweep; once its third run (the second group's first seed) has a checkpoint,
    send ``sig``. Returns the finished process."""
    out, err = open(work / "out.txt", "w"), open(work / "err.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptkit",
            "train",
            str(write_spec(work)),
            "--no-progress",
            "--run-dir",
            "sweep",
        ],
        cwd=work,
        stdout=out,
        stderr=err,
    )
    deadline = time.time() + 300
    while not list((work / "sweep").glob("03-*/checkpoints/latest")):
        assert proc.poll() is None, (work / "err.txt").read_text()
        assert time.time() < deadline, "the sweep never reached its third run"
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    out.close()
    err.close()
    return proc.returncode, (work / "err.txt").read_text()


def parent_of(work):
    state = json.loads((work / "sweep" / "sweep.json").read_text())
    return client_for(work).get_run(state["parent_run_id"])


def wait_for_status(work, status, seconds=30):
    deadline = time.time() + seconds
    while parent_of(work).info.status != status and time.time() < deadline:
        time.sleep(0.2)
    return parent_of(work)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_sweep_continues_with_its_printed_command(tmp_path, reference, sig):
    code, err = start_and_stop(tmp_path, sig)
    if sig == signal.SIGINT:
        assert code == 130, err
        assert "Traceback" not in err
        hint = err.split("Continue the sweep with: ")[1].split("\n")[0].strip()
        assert hint == "gptkit train --resume --run-dir sweep"
    else:
        assert code == -signal.SIGKILL
        hint = "gptkit train --resume --run-dir sweep"
    # Stopped: the parent says so, with an end time (a watcher does it after kill -9).
    parent = wait_for_status(tmp_path, "KILLED")
    assert parent.info.status == "KILLED" and parent.info.end_time is not None
    assert all(r.info.status != "RUNNING" for r in live_runs(tmp_path))
    state, done = finals(tmp_path / "sweep")
    assert state["status"] in ("killed",) and len(done) == 2  # two runs finished before

    again = run_cli(*hint.split()[1:], "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished before, kept") == 2
    assert "resuming sweep/03-" in again.stdout  # from its checkpoint, not from the start
    state, done = finals(tmp_path / "sweep")
    assert done == reference  # the same runs, the same figures, as if never stopped
    assert state["status"] == "finished"
    parent = parent_of(tmp_path)
    assert parent.info.status == "FINISHED" and parent.info.end_time >= parent.info.start_time
    runs = live_runs(tmp_path)
    kinds = [r.data.tags.get("gptkit.kind", "run") for r in runs]
    assert sorted(kinds) == ["group", "group", "run", "run", "run", "run", "sweep"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_resuming_a_finished_sweep_trains_nothing_and_set_is_refused(tmp_path, reference):
    spec = write_spec(tmp_path)
    assert run_cli("train", spec, "--no-progress", cwd=tmp_path).returncode == 0
    (sweep,) = (tmp_path / "runs" / "sw").glob("sweep-*")  # the default place
    before = {r.info.run_id: (r.info.status, r.info.end_time) for r in live_runs(tmp_path)}
    again = run_cli("train", spec, "--resume", "--no-progress", cwd=tmp_path)  # its newest sweep
    assert again.returncode == 0, again.stderr
    assert "has finished; nothing to train" in again.stdout
    state, done = finals(sweep)
    assert done == reference
    # The parent carries the best configuration's mean over its seeds, not a lucky seed.
    top = min(state["groups"], key=lambda g: g["val_loss_mean"])
    parent = client_for(tmp_path).get_run(state["parent_run_id"])
    assert parent.data.tags["gptkit.best_group"] == top["group"]
    assert parent.data.metrics["val_loss"] == pytest.approx(top["val_loss_mean"])
    assert parent.data.metrics["val_loss_std"] == pytest.approx(top["val_loss_std"])
    assert parent.data.metrics["val_loss"] != min(d[1] for d in done)
    assert_user_error(
        run_cli("train", "--resume", "--run-dir", sweep, "--set", "train.lr=0.1", cwd=tmp_path),
        "--set cannot change a sweep",
    )
    after = {r.info.run_id: (r.info.status, r.info.end_time) for r in live_runs(tmp_path)}
    assert after == before  # a resume that trains nothing changes nothing in MLflow


@pytest.mark.slow
def test_a_point_killed_before_its_first_checkpoint_starts_again_and_leaves_no_stray_run(
    tmp_path,
):
    spec = tmp_path / "sw.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: sw\n"
        "train: {max_steps: 400, eval_every: 400, eval_batches: 2, sample_tokens: 0,"
        " log_every: 5, threads: 1}\nsweep: {train.lr: [0.003, 0.001]}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "train", str(spec), "--no-progress", "--run-dir", "sweep"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((tmp_path / "sweep").glob("01-*/metrics.jsonl")):  # training has begun
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not list((tmp_path / "sweep").glob("01-*/checkpoints/step-*"))
    assert wait_for_status(tmp_path, "KILLED").info.status == "KILLED"
    again = run_cli("train", "--resume", "--run-dir", "sweep", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "stopped before its first checkpoint; starting it again: sweep/01-" in again.stdout
    runs = live_runs(tmp_path)  # deleted runs are not listed: one run per point, and the parent
    assert sorted(r.data.tags.get("gptkit.kind", "run") for r in runs) == ["run", "run", "sweep"]
    assert all(r.info.status == "FINISHED" for r in runs)


def _late_signal_spec(tmp_path, monkeypatch, sweep):
    """A sweep (or search) spec of 4-step runs whose first run gets a signal as it ends
    (after the loop's last look at it): the composed spec, its validation, and the names of
    the runs trained, in order."""
    from gptkit.spec.files import compose_spec_file, validate_composed
    from gptkit.training.loop import SpecTrainer

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "late.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: late\ntracking: {{enabled: false}}\n"
        "train: {max_steps: 4, eval_every: 2, eval_batches: 1, sample_tokens: 0, threads: 1}\n"
        f"sweep: {sweep}\n"
    )
    fit, runs = SpecTrainer._fit, []

    def fit_then_late_signal(self):
        fit(self)
        runs.append(self.run_dir.name)
        if len(runs) == 1:
            self._stop_signal = "SIGINT"

    monkeypatch.setattr(SpecTrainer, "_fit", fit_then_late_signal)
    composed = compose_spec_file(spec)
    return composed, validate_composed(composed, str(spec), []), runs


def test_a_signal_as_a_point_ends_stops_the_sweep_before_the_next(tmp_path, monkeypatch):
    """A signal that arrives as a point's run is ending (after the run's last check) finishes
    that run, and the sweep stops before the next point instead of losing the signal (a search
    interrupted this way went on to its last trial and exited 0); the printed command then
    keeps the finished point and trains the rest."""
    from gptkit.training.loop import Interrupted
    from gptkit.training.sweep import read_sweep_state, resume_sweep, run_sweep

    composed, resolved, runs = _late_signal_spec(
        tmp_path, monkeypatch, "{train.lr: [0.003, 0.001]}"
    )
    with pytest.raises(Interrupted, match="after 1 finished run"):
        run_sweep(composed.data, "late.yaml", [], resolved, tmp_path / "s", progress=False)
    assert len(runs) == 1
    state = read_sweep_state(tmp_path / "s")
    assert state["status"] == "killed"
    assert [p["point"] for p in state["points"]] == ["lr=0.003"]  # the kept run counted
    resume_sweep(tmp_path / "s", progress=False)
    assert len(runs) == 2  # the first point was kept, not trained again
    assert read_sweep_state(tmp_path / "s")["status"] == "finished"


@pytest.mark.slow  # a two-trial search of four steps, stopped and resumed
def test_a_signal_as_a_search_trial_ends_keeps_it_once(tmp_path, monkeypatch):
    """The search's version: the trial whose run ended as the signal came is recorded, asked
    again on resume (kept, not trained again), and in sweep.json once (it was twice)."""
    pytest.importorskip("optuna")
    from gptkit.training.loop import Interrupted
    from gptkit.training.search import resume_search, run_search
    from gptkit.training.sweep import read_sweep_state

    composed, resolved, runs = _late_signal_spec(
        tmp_path, monkeypatch, "{method: random, trials: 2, space: {train.lr: [0.003, 0.001]}}"
    )
    with pytest.raises(Interrupted, match="after 1 finished run"):
        run_search(composed.data, "late.yaml", [], resolved, tmp_path / "s", progress=False)
    state = read_sweep_state(tmp_path / "s")
    assert [p["run_dir"] for p in state["points"]] == [str(tmp_path / "s" / "trial-000")]
    resume_search(tmp_path / "s", state, progress=False, command=None)
    assert len(runs) == 2 and runs.count("trial-000") == 1  # kept, not trained again
    state = read_sweep_state(tmp_path / "s")
    dirs = [p["run_dir"] for p in state["points"]]
    assert len(dirs) == 2 and len(set(dirs)) == 2 and state["status"] == "finished", dirs


@pytest.mark.slow  # a two-point sweep of two steps, then three resumes: ~15 s
def test_a_sweep_folder_continued_imports_only_trusted_plugins(tmp_path):
    """A sweep folder is opened as any run is: a module its spec (or the overrides its
    sweep.json records) names under plugins: is not imported unless installed or allowed; a
    damaged sweep.json is named; a sweep cannot set plugins: point by point."""
    (tmp_path / "evil.py").write_text("open('IMPORTED', 'w').close()\n")  # on sys.path (cwd)
    spec = tmp_path / "sw.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: sw\ntracking: {{enabled: false}}\n"
        "train: {max_steps: 2, eval_every: 2, sample_tokens: 0, warmup_steps: 0}\n"
        "sweep: {seed: [1, 2]}\n"
    )
    trained = run_cli("train", spec, "--no-progress", "--run-dir", "sw", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    sweep, state = tmp_path / "sw", json.loads((tmp_path / "sw" / "sweep.json").read_text())
    original = (sweep / "sweep-spec.yaml").read_text()
    for spec_text, overrides in (
        (original + "plugins: [evil]\n", state["overrides"]),
        (original, [*state["overrides"], "plugins=[evil]"]),
    ):
        (sweep / "sweep-spec.yaml").write_text(spec_text)
        (sweep / "sweep.json").write_text(
            json.dumps({**state, "status": "running", "overrides": overrides})
        )
        resumed = run_cli("train", "--resume", "--run-dir", sweep, cwd=tmp_path)
        assert_user_error(resumed, "names plugin module(s) 'evil'", "GPTKIT_PLUGINS=evil")
        assert not (tmp_path / "IMPORTED").exists()
    (sweep / "sweep-spec.yaml").write_text(original)
    (sweep / "sweep.json").write_text(json.dumps({**state, "status": "running", "overrides": 5}))
    damaged = run_cli("train", "--resume", "--run-dir", sweep, cwd=tmp_path)
    assert_user_error(damaged, "its sweep.json is damaged")
    spec.write_text(f"extends: {SMOKE}\nsweep: {{plugins: [[evil]]}}\n")
    assert_user_error(run_cli("validate", spec, cwd=tmp_path), "plugins cannot be swept")
    assert not (tmp_path / "IMPORTED").exists()


def test_an_interruption_python_dropped_stops_the_sweep_before_its_next_run(tmp_path):
    """Ctrl-C's KeyboardInterrupt raised inside a weakref callback is dropped by Python
    ("Exception ignored"): a search in CI went on to its end, exit 0. The sweep remembers it
    and stops before its next run (KILLED, resumable)."""
    from gptkit.training.sweep import SweepParent, SweepRun

    before = signal.getsignal(signal.SIGINT)
    sweep = SweepRun(tmp_path, {}, SweepParent(None, None), "sweep", [])
    try:
        sweep.check()  # nothing came: goes on
        with pytest.raises(KeyboardInterrupt):  # the raise Python may drop
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # as Python calls it
        with pytest.raises(KeyboardInterrupt):  # remembered
            sweep.check()
    finally:
        sweep._close("killed")
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((tmp_path / "sweep.json").read_text())["status"] == "killed"
