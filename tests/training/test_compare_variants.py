"""Comparing across variants: specs made with ``extends:`` land in their root parent's MLflow
experiment, and ``gptkit compare`` takes several targets (spec files, run folders,
``--experiment a,b``) with mean ± std per configuration and the separation verdict, adding no
runs."""

import json

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


def variant(folder, name, lr):
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"extends: base.yaml\nname: {name}\ntrain: {{lr: {lr}}}\nrepeats: 2\n"  # seeds 0 and 1
    )
    return spec


@pytest.mark.slow
def test_compare_across_two_extends_variants_by_spec_folder_and_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    base = SMOKE.read_text().replace("name: smoke", "name: family")  # a root of its own
    base = base.replace("max_steps: 20", "max_steps: 4").replace("eval_every: 10", "eval_every: 2")
    (tmp_path / "base.yaml").write_text(base.replace("sample_tokens: 40", "sample_tokens: 0"))
    fast, slow = variant(tmp_path, "fast", 0.03), variant(tmp_path, "slow", 1.0e-6)
    for spec in (fast, slow):
        out = run_cli("train", spec, "--no-progress", "--run-dir", spec.stem, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = {e.name for e in client.search_experiments()}
    assert "family" in names and not {"fast", "slow"} & names  # one experiment, the root's
    count = len(client.search_runs([client.get_experiment_by_name("family").experiment_id]))

    def groups(*args):
        result = run_cli("compare", *args, "--json", "--plot", tmp_path / "c.png", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        return report, [(g["name"], g["n"]) for g in report["groups"]]

    by_spec, rows = groups(fast, slow)
    assert rows == [("fast", 2), ("slow", 2)]  # mean ± std over the seeds, best first
    verdict = by_spec["verdict"]  # Welch's test between the two variants' seeds
    assert verdict["best"] == "fast" and verdict["next"] == "slow" and 0 <= verdict["p_value"] <= 1
    assert all(g["val_loss_std"] >= 0 for g in by_spec["groups"])
    assert groups("fast", "slow")[1] == rows  # the same, asked by folder
    assert groups("--experiment", "family")[1] == rows  # and by the shared experiment
    assert groups("fast")[1] == [("fast", 2)]  # one folder: its runs only
    table = run_cli("compare", fast, slow, "--plot", tmp_path / "c.png", cwd=tmp_path)
    assert "train.lr" in table.stdout and "± " in table.stdout and "Welch t" in table.stdout
    assert len(client.search_runs([client.get_experiment_by_name("family").experiment_id])) == count
    assert_user_error(
        run_cli("compare", "nothing-here", cwd=tmp_path), "no MLflow experiment or spec"
    )


def test_compare_where_nothing_was_tracked_says_so_and_creates_no_store(tmp_path, monkeypatch):
    """The default store (sqlite:///mlflow.db) missing: a clear error, and no empty mlflow.db
    left behind (MLflow made one: compare "adds nothing")."""
    from gptkit.errors import GptkitError
    from gptkit.training.compare import compare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(GptkitError, match="no MLflow store at .*mlflow.db: nothing was tracked"):
        compare(["runs/x"], None, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # makes an MLflow store (seconds)
def test_compare_of_a_folder_tracked_on_another_store_names_that_store(tmp_path):
    """A run trained against a server, compared with the default store, was told "no runs
    with an MLflow record in this store", though its mlflow.json names the server."""
    from mlflow.tracking import MlflowClient

    from gptkit.errors import GptkitError
    from gptkit.training.compare import compare

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # an MLflow store, without this run
    run = tmp_path / "runs" / "srv2"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text("name: srv2\n")
    link = {"uri": "http://127.0.0.1:5077", "run_id": "0f" * 16, "experiment_id": "1"}
    (run / "mlflow.json").write_text(json.dumps(link))
    with pytest.raises(GptkitError) as info:
        compare([str(run)], store, tmp_path / "c.png")
    assert "its runs were tracked at http://127.0.0.1:5077" in str(info.value)
    assert "--tracking-uri http://127.0.0.1:5077" in str(info.value)
