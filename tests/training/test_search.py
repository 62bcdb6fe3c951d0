"""Search beyond the grid: ``sweep: {method: tpe, trials: N, space: ...}`` backed by Optuna.
Each trial is an MLflow child run; hopeless trials are pruned at evaluations; the study (its
RDB storage in the search folder) survives an interruption and continues with the printed
command; the best trial is what ``gptkit compare`` ranks first. Real subprocesses and signals."""

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
    f"extends: {SMOKE}\nname: srch\n"
    "train: {max_steps: 12, eval_every: 3, eval_batches: 2, sample_tokens: 0, log_every: 6,"
    " warmup_steps: 0, threads: 1}\n"
    "sweep:\n  method: tpe\n  trials: 12\n  space:\n"
    "    train.lr: {low: 1.0e-5, high: 3.0e-2, log: true}\n"
    "    model.positional.kind: [learned, rope]\n"
)


@pytest.mark.slow
def test_a_tpe_search_prunes_resumes_after_ctrl_c_and_its_best_trial_is_compared_first(tmp_path):
    optuna = pytest.importorskip("optuna")
    spec = tmp_path / "srch.yaml"
    spec.write_text(SPEC)
    assert "tpe search: 12 trials" in run_cli("validate", spec, cwd=tmp_path).stdout
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gptkit", "train", str(spec), "--no-progress", "--run-dir", "s"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.time() + 300
        while not list((tmp_path / "s").glob("trial-004/checkpoints/latest")):
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    hint = stderr.split("Continue the search with: ")[1].split("\n")[0].strip()
    assert hint == "gptkit train --resume --run-dir s"

    again = run_cli(*hint.split()[1:], "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # The stopped trial goes on in its own folder: from its checkpoint, or kept if it had ended
    # (pruned at its first evaluation, say) before the signal was seen.
    out = again.stdout
    assert "resuming s/trial-004 from" in out or "finished before, kept: s/trial-004" in out

    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 12
    assert states.count("PRUNED") >= 1 and states.count("FAIL") <= 1  # the one stopped, retold
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert state["status"] == "finished" and state["best"]["value"] == study.best_value
    pruned = [p for p in state["points"] if p["stop_reason"] == "pruned"]
    assert pruned and all(
        json.loads((tmp_path / p["run_dir"] / "run.json").read_text())["summary"]["steps"] < 12
        for p in pruned
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["val_loss"] == pytest.approx(study.best_value)
    compared = run_cli("compare", "smoke", "--json", "--plot", tmp_path / "c.png", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    groups = json.loads(compared.stdout)["groups"]
    top = groups[0]
    # A trial asked again after the interruption gets a new number from Optuna; to the user it
    # keeps its own: its label, folder, sweep.json entry and MLflow run agree.
    best = study.best_trial.user_attrs["trial"]
    assert top["name"].startswith(f"trial {best}: ") and state["best"]["trial"] == best
    for number, folder in state["folders"].items():
        assert folder == f"trial-{int(number):03d}", state["folders"]
    for p in state["points"]:
        assert p["run_dir"].endswith(state["folders"][str(p["trial"])]), p
        assert p["group"].startswith(f"trial {p['trial']}: "), p
    # A pruned trial's loss is from the step it stopped at: its name says so (trials that
    # drew the same point are one group, named by its first run).
    marked = {g["name"].removesuffix(" (pruned)") for g in groups if "(pruned)" in g["name"]}
    assert marked and marked <= {p["point"] for p in pruned}, (marked, pruned)
    assert top["val_loss"] == pytest.approx(study.best_value)


@pytest.mark.slow
def test_a_bad_search_space_is_refused_naming_the_entry(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: bad\nsweep:\n  method: tpe\n  trials: 3\n  space:\n"
        "    model.positional.kind: [rope, rpoe]\n"
    )
    assert_user_error(run_cli("validate", spec), 'search space model.positional.kind="rpoe"')
    spec.write_text(f"extends: {SMOKE}\nname: bad\nsweep: {{method: grid, trials: 3}}\n")
    assert_user_error(run_cli("validate", spec), "sweep.method: 'random' or 'tpe'")


@pytest.mark.slow  # three CLI resumes
def test_a_search_folder_whose_study_names_folders_outside_it_is_refused(tmp_path):
    """A search folder someone hands you: its study.db (Optuna's, read on resume) says where
    each trial's run is. A folder that is not trial-NNN inside the search (an absolute path,
    ``../x``) or a trial number that is not a count is refused, exit 2, nothing written
    outside; before, resume trained (and pruned the checkpoints of) whatever run it named."""
    optuna = pytest.importorskip("optuna")
    import yaml

    from gptkit.spec.files import compose_spec_file

    root = tmp_path / "s"
    root.mkdir()
    (tmp_path / "srch.yaml").write_text(
        f"extends: {SMOKE}\nname: srch\ntracking: {{enabled: false}}\n"
        "train: {max_steps: 2, eval_every: 2, sample_tokens: 0, warmup_steps: 0}\n"
        "sweep: {method: random, trials: 1, space: {train.lr: [0.001, 0.002]}}\n"
    )
    composed = compose_spec_file(tmp_path / "srch.yaml").data
    (root / "sweep-spec.yaml").write_text(yaml.safe_dump(composed))
    state = {"kind": "search", "source": "x.yaml", "overrides": [], "parent_run_id": None}
    outside = tmp_path / "victim"
    for folder, number, said in (
        (str(outside), 0, "the folder"),
        ("../victim", 0, "the folder"),
        ("trial-000", "abc", "not a count"),
    ):
        (root / "study.db").unlink(missing_ok=True)
        (root / "sweep.json").write_text(
            json.dumps({**state, "folders": {}, "status": "running", "points": [], "groups": []})
        )
        study = optuna.create_study(study_name="srch", storage=f"sqlite:///{root / 'study.db'}")
        lr = optuna.distributions.CategoricalDistribution([0.001, 0.002])
        trial = study.ask({"train.lr": lr})
        trial.set_user_attr("folder", folder)
        trial.set_user_attr("trial", number)
        resumed = run_cli("train", "--resume", "--run-dir", root, "--no-progress", cwd=tmp_path)
        assert_user_error(resumed, "study.db gives", said, "start the search again")
        assert not outside.exists()
        assert not list(root.glob("trial-*/checkpoints"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "trial-007").symlink_to(elsewhere)  # a trial-NNN name, but a link out
    (root / "study.db").unlink()
    study = optuna.create_study(study_name="srch", storage=f"sqlite:///{root / 'study.db'}")
    trial = study.ask({"train.lr": lr})
    trial.set_user_attr("folder", "trial-007")
    trial.set_user_attr("trial", 7)
    resumed = run_cli("train", "--resume", "--run-dir", root, "--no-progress", cwd=tmp_path)
    assert_user_error(resumed, "holds symbolic links: trial-007")  # the run folder's own rule
    assert not any(elsewhere.iterdir())
    (root / "trial-007").unlink()
    (root / "study.db").write_bytes(b"not a database" * 100)
    resumed = run_cli("train", "--resume", "--run-dir", root, "--no-progress", cwd=tmp_path)
    assert_user_error(resumed, "cannot be opened as the search's study", "start the search again")
