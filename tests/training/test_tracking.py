"""MLflow tracking against a real SQLite store and a real `mlflow server`, including an outage."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.helpers import run_cli
from tests.mlflow_server import MlflowServer, Proxy

pytestmark = pytest.mark.slow  # every test here trains, serves or spawns the CLI

SMOKE = ROOT / "experiments" / "smoke.yaml"


def only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_sqlite_store_gets_params_metrics_and_artifacts(smoke_run):
    client = MlflowClient(f"sqlite:///{smoke_run.parent / 'mlflow.db'}")
    run = only_run(client, "smoke")
    assert run.info.run_id == json.loads((smoke_run / "mlflow.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.d_model"] == "32" and p["model.attention.kind"] == "mha"
    assert p["model.vocab_size"] == "66" and p["tokenizer.kind"] == "char"
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [10, 20]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_sec", "val_ppl"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "loss_curve.png", "metrics.jsonl", "samples.txt", "tokenizer"} <= names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.kill()


def test_remote_server_receives_the_run(server, tmp_path):
    result = run_cli(
        "train",
        SMOKE,
        "--no-progress",
        "--set",
        f"tracking.uri={server.uri}",
        "--set",
        "tracking.experiment=remote",
        "--run-dir",
        tmp_path / "run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # gptkit says where the run is, once; MLflow's own "View run" lines are not mixed in
    assert "View run" not in result.stdout + result.stderr, result.stdout
    assert (result.stdout + result.stderr).count("MLflow run: ") == 1
    client = MlflowClient(server.uri)
    run = only_run(client, "remote")
    assert run.data.params["train.max_steps"] == "20"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    local = client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path))
    assert "d_model: 32" in open(local).read()
    assert not (tmp_path / "run" / "mlflow-spool.jsonl").exists()


def outage_run(tmp_path, uri, experiment, steps, *extra):
    """A logging-heavy training subprocess against ``uri``, and a wait until its MLflow run
    exists on the server (so an outage hits a run in progress)."""
    args = [
        sys.executable,
        "-m",
        "gptkit",
        "train",
        str(SMOKE),
        "--no-progress",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"tracking.uri={uri}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.log_every=1",
        "--set",
        "train.threads=1",
        "--set",
        f"tracking.experiment={experiment}",
        *extra,
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "run" / "mlflow.json").exists():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    return proc, args


def test_server_killed_mid_run_training_finishes_and_catches_up(tmp_path):
    srv = MlflowServer(tmp_path / "srv").start()
    steps = 600
    proc, args = outage_run(tmp_path, srv.uri, "outage", steps, "--set", "train.eval_every=100")
    try:
        assert proc.poll() is None, "training ended before the outage"
        srv.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        srv.kill()
    assert proc.returncode == 0, err
    assert "MLflow tracking at" in err and "failed" in err and "spooled" in err
    run_dir = tmp_path / "run"
    # Nothing is lost from the run directory.
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / f"step-{steps:06d}" / "model.safetensors").exists()
    assert (run_dir / "mlflow-spool.jsonl").exists()

    # The server comes back (same store, same port); resuming sends what was spooled, and
    # nothing else: the resume trains nothing, so the run (its files, its record) is as it was.
    spooled_end = [
        json.loads(x)
        for x in (run_dir / "mlflow-spool.jsonl").read_text().splitlines()
        if '"op": "end"' in x or '"op":"end"' in x
    ]
    info_before = (run_dir / "run.json").read_bytes()
    srv2 = MlflowServer(tmp_path / "srv", port=srv.port).start()
    try:
        again = subprocess.run(
            args + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr
        assert "nothing to train" in again.stdout, again.stdout
        client = MlflowClient(srv2.uri)
        run = only_run(client, "outage")
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted({m.step for m in history}) == list(range(1, steps + 1))
        assert run.info.status == "FINISHED"
        assert not (run_dir / "mlflow-spool.jsonl").exists()
        assert (run_dir / "run.json").read_bytes() == info_before
        assert not [t for t in run.data.tags if t.startswith("gptkit.resumed_at")], run.data.tags
        assert [run.info.end_time] == [e["end_time"] for e in spooled_end]
    finally:
        srv2.kill()


def test_a_run_whose_server_was_down_from_its_start_is_recorded_as_it_ran(tmp_path):
    """No MLflow run could be made: everything was spooled. The run made on --resume starts
    when the training did, and its description is the command that trained it."""
    from tests.mlflow_server import free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        "train", SMOKE, "--no-progress", "--run-dir", tmp_path / "run",
        "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=down",
        "--set", "train.max_steps=6", "--set", "train.eval_every=3",
    ]  # fmt: skip
    first = run_cli(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "mlflow-spool.jsonl").exists()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    time.sleep(1.5)  # the resume's clock is visibly later
    srv = MlflowServer(tmp_path / "srv", port=port).start()
    try:
        again = run_cli(*command, "--resume", "--set", "train.max_steps=9", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        run = only_run(MlflowClient(uri), "down")
    finally:
        srv.kill()
    assert run.info.start_time == int(info["created"] * 1000)
    note = run.data.tags["mlflow.note.content"]
    assert "--resume" not in note and "train.max_steps=6" in note, note
    assert "gptkit.resumed_at.6" in run.data.tags
    assert run.data.params["train.max_steps"] == "6"  # the params of the run as it began


def test_server_away_and_back_during_the_run_gets_everything_without_resume(tmp_path):
    """The server dies mid-run and comes back (same store and port) while training goes on:
    the spooled metrics are delivered by the end of the run itself."""
    srv = MlflowServer(tmp_path / "srv").start()
    steps = 1500
    proc, _ = outage_run(
        tmp_path,
        srv.uri,
        "flaky",
        steps,
        "--set",
        "train.eval_every=500",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "train.batch_size=32",
    )  # long enough to outlast a restart
    srv2 = None
    try:
        srv.kill()
        time.sleep(1.0)
        srv2 = MlflowServer(tmp_path / "srv", port=srv.port).start()
        assert proc.poll() is None, "training ended before the server came back"
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "failed" in err and "is back" in err, err
        assert not (tmp_path / "run" / "mlflow-spool.jsonl").exists()
        client = MlflowClient(srv2.uri)
        run = only_run(client, "flaky")
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted({m.step for m in history}) == list(range(1, steps + 1))
        assert run.info.status == "FINISHED"
    finally:
        proc.kill()
        srv.kill()
        if srv2:
            srv2.kill()


def test_a_resume_that_changes_the_spec_is_what_mlflow_and_compare_say(tmp_path):
    """An MLflow param cannot change: a resume's new values are ``gptkit.param.*`` tags, which
    ``params_of`` (and so ``gptkit compare``) reads over the params. A run trained 10 steps
    with early stopping, then resumed to 20 without it, compares as the same spec as a run
    trained 20 steps straight (no differing column), not as max_steps 10 with patience 5."""
    from gptkit.training.compare import compare, rows_of
    from gptkit.training.tracking import params_of

    common = ["--no-progress", "--set", "train.sample_tokens=0", "--set", "train.eval_every=5"]
    first = ["--set", "train.max_steps=10", "--set", "train.early_stop={patience: 5}"]
    for args in (
        [SMOKE, *common, *first, "--run-dir", "resumed"],
        ["--resume", *common, "--set", "train.max_steps=20", "--set", "train.early_stop=null"]
        + ["--run-dir", "resumed"],
        [SMOKE, *common, "--run-dir", "straight"],
    ):
        result = run_cli("train", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    run_id = json.loads((tmp_path / "resumed" / "mlflow.json").read_text())["run_id"]
    resumed = client.get_run(run_id)
    assert resumed.data.params["train.max_steps"] == "10"  # as logged at the start
    now = params_of(resumed)
    assert now["train.max_steps"] == "20"
    assert not any(k.startswith("train.early_stop") for k in now), now
    rows = rows_of(client, runs)
    assert len(rows) == 2 and rows[0]["params"] == rows[1]["params"]
    shown = compare([str(tmp_path / "resumed"), str(tmp_path / "straight")], uri, tmp_path)
    header = shown.grid[0]
    assert "train.max_steps" not in header and not any("early_stop" in h for h in header)


def test_a_tracking_store_that_is_not_mlflows_is_refused_before_a_run(tmp_path):
    """tracking.uri naming an app's SQLite database (or any other file): MLflow added its
    tables to it (a resumed run's spec, someone else's, may name any file). Refused before a
    run folder is made, the file untouched; an MLflow store or a new file is taken."""
    import sqlite3

    from gptkit.errors import GptkitError
    from gptkit.training.tracking import resolve_uri

    app = tmp_path / "app.sqlite"
    with sqlite3.connect(app) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    before = app.read_bytes()
    (tmp_path / "notes.txt").write_text("not a database")
    for path, says in ((app, "a SQLite database of something else"),
                       (tmp_path / "notes.txt", "not a SQLite database")):  # fmt: skip
        with pytest.raises(GptkitError, match=f"{path} is {says}, not an MLflow store"):
            resolve_uri(f"sqlite:///{path}")
    result = run_cli(
        "train", SMOKE, "--run-dir", tmp_path / "run", "--no-progress",
        "--set", f"tracking.uri=sqlite:///{app}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "not an MLflow store" in result.stderr, result.stderr
    assert app.read_bytes() == before and not (tmp_path / "run").exists()
    assert resolve_uri(f"sqlite:///{tmp_path / 'new.db'}").endswith("new.db")


def _tracker(uri, run_dir):
    from gptkit.training.tracking import Tracker

    warned: list[str] = []
    run_dir.mkdir(exist_ok=True)
    return Tracker(uri, "net", run_dir, "r", warn=warned.append), warned


def _wait_for_run(run_dir, timeout=60.0):
    deadline = time.time() + timeout
    while not (run_dir / "mlflow.json").exists():
        assert time.time() < deadline, "the tracker made no MLflow run"
        time.sleep(0.05)
    return json.loads((run_dir / "mlflow.json").read_text())["run_id"]


def test_a_slow_server_is_waited_for_at_the_end_while_it_takes_events(server, tmp_path):
    """close()'s timeout bounds a wait in which nothing is sent, not the whole sending: a
    backlog that takes longer than it to send, request after request, is all delivered."""
    proxy = Proxy(server.port, delay=0.5)  # 0.5 s a request; 8 s without any is a stall
    try:
        tracker, _ = _tracker(proxy.uri, tmp_path)
        tracker.log_params({"a": "1"})
        run_id = _wait_for_run(tmp_path)  # made; then a backlog as an outage leaves one
        for i in range(30):
            tracker.set_tags({f"t{i}": str(i)})  # a request each: 15 s or more in all
        t0 = time.time()
        assert tracker.close(timeout=8.0) == 0
        assert time.time() - t0 > 8.0  # it did outlast the timeout
    finally:
        proxy.close()
    tags = MlflowClient(server.uri).get_run(run_id).data.tags
    assert {f"t{i}" for i in range(30)} <= set(tags)
    assert not (tmp_path / "mlflow-spool.jsonl").exists()


def test_a_dropped_connection_at_the_end_is_tried_again_a_refused_one_is_not(server, tmp_path):
    """At a run's end a server that is there (a dropped connection, a timeout) gets more
    tries within close()'s timeout; an address nobody listens on gets one."""
    from tests.mlflow_server import free_port

    proxy = Proxy(server.port)
    try:
        tracker, warned = _tracker(proxy.uri, tmp_path / "dropped")
        tracker.log_metrics({"loss": 1.0}, 1)
        run_id = _wait_for_run(tmp_path / "dropped")
        proxy.drop(3)
        tracker.log_metrics({"loss": 0.5}, 2)
        assert tracker.close(timeout=20.0) == 0, warned
    finally:
        proxy.close()
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert any("failed" in w for w in warned) and any("is back" in w for w in warned), warned
    assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"

    nobody, _ = _tracker(f"http://127.0.0.1:{free_port()}", tmp_path / "nobody")
    nobody.log_metrics({"loss": 1.0}, 1)
    t0 = time.time()
    assert nobody.close(timeout=30.0) > 0  # spooled for --resume ...
    assert time.time() - t0 < 20.0  # ... without waiting out the timeout for nobody
    assert (tmp_path / "nobody" / "mlflow-spool.jsonl").exists()
