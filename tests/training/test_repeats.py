"""Experiments as research: seeds and repeats grouped in MLflow, `gptkit compare` aggregating runs
that differ only by seed with a separation verdict, early stopping with a recorded stop reason,
and runs that store their resolved spec (no `extends`)."""

import json
import math

import pytest

from gptkit.training.compare import group_runs, separation
from gptkit.training.stats import mean_std, welch
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
TINY = "train: {max_steps: 4, eval_every: 2, eval_batches: 2, sample_tokens: 0, log_every: 2}\n"


# ---------------------------------------------------------------- statistics (no training)


def test_welch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    cases = [
        ([3.41, 3.52, 3.47], [3.60, 3.58, 3.71]),
        ([1.0, 2.0], [1.5, 2.5, 3.5, 0.2]),
        ([2.04, 2.05, 2.06, 2.03, 2.07], [2.09, 2.11, 2.10]),
    ]
    for a, b in cases:
        ours, ref = welch(a, b), stats.ttest_ind(a, b, equal_var=False)
        assert math.isclose(ours.t, ref.statistic, rel_tol=1e-9)
        assert math.isclose(ours.p, ref.pvalue, rel_tol=1e-7, abs_tol=1e-12)


def test_welch_edge_cases():
    assert welch([1.0, 1.0], [1.0, 1.0]).p == 1.0  # identical, no spread: nothing to separate
    assert welch([1.0, 1.0], [2.0, 2.0]).p == 0.0  # different, no spread: separated
    assert welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]).p == pytest.approx(1.0)
    with pytest.raises(ValueError):
        welch([1.0], [2.0, 3.0])
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(1.5275252316519468)


def fake_run(name, seed, final, params):
    return {
        "run_id": f"{name}-{seed}",
        "name": f"{name} seed={seed}",
        "params": {**params, "seed": str(seed)},
        "val_loss": final,
        "best_val_loss": final - 0.01,
        "tokens_per_sec": 100.0,
        "curve": [(2, final + 0.5), (4, final)],
        "status": "FINISHED",
        "step": 4,
    }


def test_runs_differing_only_by_seed_form_one_row_and_the_verdict_flips():
    base = [
        fake_run("positional=rope", s, v, {"model.positional.kind": "rope"})
        for s, v in ((1, 2.04), (2, 2.06), (3, 2.05))
    ]
    far = [
        fake_run("positional=alibi", s, v, {"model.positional.kind": "alibi"})
        for s, v in ((1, 2.30), (2, 2.33), (3, 2.31))
    ]
    groups = group_runs(base + far)
    assert [(g["name"], g["n"]) for g in groups] == [
        ("positional=rope", 3),
        ("positional=alibi", 3),
    ]
    assert groups[0]["val_loss"] == pytest.approx(2.05)
    assert groups[0]["val_loss_std"] == pytest.approx(0.01)
    assert groups[0]["curve"][0] == pytest.approx((2, 2.55, 0.01))
    verdict = separation(groups)
    assert verdict["separated"] is True and verdict["p_value"] < 0.05
    # The same losses under another kind's name: not separated.
    same = [
        fake_run(
            "positional=alibi",
            r["params"]["seed"],
            r["val_loss"],
            {"model.positional.kind": "alibi"},
        )
        for r in base
    ]
    verdict = separation(group_runs(base + same))
    assert verdict["separated"] is False and verdict["p_value"] == pytest.approx(1.0)
    assert "not separated" in verdict["text"]
    # One run per group: no verdict, and it says why.
    verdict = separation(group_runs(base[:1] + far[:1]))
    assert verdict["separated"] is None and "2 or more runs per group" in verdict["text"]


def test_runs_of_one_seed_are_one_training_not_repeats():
    """A run and its copy (an interrupted run and the same run uninterrupted, both seed 7)
    were n=2 with std 0, and entered Welch's test as independent repeats."""
    from gptkit.training.compare import caveats

    params = {"model.positional.kind": "rope"}
    twice = [fake_run("a", 7, 2.4489, params), {**fake_run("a", 7, 2.4489, params), "run_id": "x"}]
    other = [fake_run("b", 7, 2.40, {"model.positional.kind": "alibi"})]
    groups = group_runs(twice + other)
    (a,) = [g for g in groups if g["params"]["model.positional.kind"] == "rope"]
    assert a["n"] == 1 and a["seeds"] == ["7"]
    assert separation(groups)["separated"] is None  # one training each: no verdict
    (said,) = caveats(groups)
    assert "same params and seed; counted once" in said and "seed 7" in said


def test_a_run_that_did_not_finish_is_left_out_and_named():
    """A run killed at step 10 was averaged with the finished run of its config (n=2)."""
    from gptkit.training.compare import finished_rows

    params = {"model.positional.kind": "rope"}
    done = fake_run("a", 1, 2.18, params)
    killed = {**fake_run("a", 2, 3.67, params), "status": "KILLED", "step": 10}
    rows, said = finished_rows([done, killed])
    assert rows == [done]
    assert said == ["left out 1 run(s) that did not finish: 'a seed=2' (KILLED at step 10)"]
    rows, said = finished_rows([killed])  # nothing finished: shown, and said so
    assert rows == [killed] and "no run finished" in said[0]


def test_losses_of_different_tokenizers_are_said_not_comparable_and_names_are_unique():
    from gptkit.training.compare import caveats

    char = fake_run("base", 1, 2.4, {"tokenizer.kind": "char", "model.vocab_size": "66"})
    byte = fake_run("base", 1, 2.9, {"tokenizer.kind": "byte", "model.vocab_size": "257"})
    byte["run_id"] = "e0e0e0e0e0"
    groups = group_runs([char, byte])
    (said,) = caveats(groups)
    assert "different tokenizers: byte (vocab 257), char (vocab 66)" in said
    assert "not comparable" in said
    # two groups of one name (two sweeps' "lr=0.003", say): the verdict must name one row
    assert len({g["name"] for g in groups}) == 2
    assert all(g["name"].startswith("base seed=1 [") for g in groups)


# ---------------------------------------------------------------- real sweeps (slow)


def sweep_spec(tmp_path, grid):
    spec = tmp_path / "rep.yaml"
    spec.write_text(f"extends: {SMOKE}\nname: rep\n{TINY}sweep: {grid}\n")
    return spec


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid, separated",
    [
        # lr 0.03 vs 1e-6: after 4 steps one has learned, the other has not.
        ("{train.lr: [0.03, 1.0e-6], seed: [1, 2, 3]}", True),
        # Two sampler kinds with no text sampled during training: identical trainings.
        ("{sampler.kind: [top_k, greedy], seed: [1, 2, 3]}", False),
    ],
)
def test_sweep_with_seeds_groups_in_mlflow_and_compare_gives_a_verdict(tmp_path, grid, separated):
    from mlflow.tracking import MlflowClient

    result = run_cli(
        "train",
        sweep_spec(tmp_path, grid),
        "--no-progress",
        "--run-dir",
        tmp_path / "sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(summary["points"]) == 6 and [g["n"] for g in summary["groups"]] == [3, 3]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")  # extends smoke.yaml: its experiment
    runs = client.search_runs([exp.experiment_id])
    groups = [r for r in runs if r.data.tags.get("gptkit.kind") == "group"]
    assert len(groups) == 2
    # The sweep's parent says what made it, as a run's record does, and keeps its files.
    parent = client.get_run(summary["parent_run_id"])
    assert "gptkit train" in parent.data.tags["mlflow.note.content"]
    assert str((tmp_path / "sweep").resolve()) in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["gptkit.spec_name"] == "rep"
    attached = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep-spec.yaml", "sweep.json"} <= attached, attached
    for group in groups:
        assert group.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
        finals = [k.data.metrics["summary.final_val_loss"] for k in kids]
        assert len(kids) == 3 and {k.data.params["seed"] for k in kids} == {"1", "2", "3"}
        mean, std = mean_std(finals)
        assert group.data.metrics["val_loss_mean"] == pytest.approx(mean)
        assert group.data.metrics["val_loss_std"] == pytest.approx(std)
        assert "best_val_loss_mean" in group.data.metrics and group.data.metrics["n"] == 3

    cmp = run_cli("compare", "rep", "--json", "--plot", tmp_path / "c.png", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stderr
    report = json.loads(cmp.stdout)
    assert [g["n"] for g in report["groups"]] == [3, 3]
    assert all(g["val_loss_std"] >= 0 and g["val_loss"] > 0 for g in report["groups"])
    assert report["verdict"]["separated"] is separated
    assert (tmp_path / "c.png").stat().st_size > 1000
    table = run_cli("compare", "rep", "--plot", tmp_path / "c.png", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert " ± " in table.stdout and "Welch t = " in table.stdout
    assert ("-> separated" in table.stdout) is separated


@pytest.mark.slow
def test_repeats_runs_each_point_with_consecutive_seeds(tmp_path):
    spec = tmp_path / "r.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: r\nseed: 10\nrepeats: 2\n{TINY}tracking: {{enabled: false}}\n"
    )
    result = run_cli("train", spec, "--no-progress", "--run-dir", tmp_path / "sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["seed"] for p in summary["points"]] == [10, 11]
    assert summary["groups"][0]["group"] == "r" and summary["groups"][0]["n"] == 2
    both = tmp_path / "both.yaml"
    both.write_text(spec.read_text() + "sweep: {seed: [1, 2]}\n")
    assert_user_error(run_cli("train", both, cwd=tmp_path), "both sweep.seed and repeats")


@pytest.mark.slow
def test_early_stop_ends_the_run_and_records_why(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A learning rate too small to move the loss: no evaluation improves by min_delta.
    result = run_cli(
        "train",
        SMOKE,
        "--no-progress",
        "--run-dir",
        tmp_path / "run",
        "--set",
        "train.lr=1e-9",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.sample_tokens=0",
        "--set",
        f"tracking.uri={db}",
        "--set",
        "train.early_stop={patience: 2, min_delta: 0.01}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "early stop" in result.stdout + result.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stop_reason"] == "early_stop" and info["summary"]["stop_reason"] == "early_stop"
    assert info["summary"]["steps"] == 6  # evals at 2 (the first best), 4 and 6 (no better)
    assert (tmp_path / "run" / "checkpoints" / "step-000006").is_dir()  # the stop is kept
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    assert MlflowClient(db).get_run(run_id).data.tags["gptkit.stop_reason"] == "early_stop"
    # Resumed as it is, it has nothing to train, and says why: the early stop, not max_steps.
    again = run_cli("train", "--resume", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "stopped early at step 6" in again.stdout and "train.early_stop=null" in again.stdout
    assert "raise it with --set train.max_steps" not in again.stdout
    # Without the rule the same run goes to max_steps, and says so.
    full = run_cli(
        "train",
        SMOKE,
        "--no-progress",
        "--run-dir",
        tmp_path / "full",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "tracking.enabled=false",
        cwd=tmp_path,
    )
    assert full.returncode == 0, full.stderr
    assert json.loads((tmp_path / "full" / "run.json").read_text())["stop_reason"] == "max_steps"


@pytest.mark.slow
def test_a_run_stores_its_resolved_spec_and_no_longer_needs_its_parent(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(SMOKE.read_text().replace("name: smoke", "name: from-base"))
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: base.yaml\nmodel: {n_layers: 1}\n" + TINY + "tracking: {enabled: false}\n"
    )
    result = run_cli("train", child, "--no-progress", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import yaml

    stored = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    assert "extends" not in stored
    assert stored["name"] == "from-base" and stored["model"]["n_layers"] == 1
    assert stored["model"]["d_model"] == 32 and stored["sampler"]["kind"] == "top_k"
    base.unlink()  # the run is self-contained from here on
    more = run_cli(
        "train",
        "--resume",
        "--run-dir",
        tmp_path / "run",
        "--no-progress",
        "--set",
        "train.max_steps=6",
        cwd=tmp_path,
    )
    assert more.returncode == 0, more.stderr
    gen = run_cli("generate", tmp_path / "run", "--prompt", "A", "-n", "3", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr


@pytest.mark.slow
def test_the_record_has_no_blanks_and_a_resume_with_nothing_to_train_changes_nothing(tmp_path):
    """The MLflow dataset digest is the data's content hash (the one `gptkit prepare` reports);
    patience spent on the very last step is not an early stop; a resume that trains nothing
    leaves the run's files and MLflow record as they were."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"extends: {SMOKE}\nname: blanks\ndata: {{source: {tmp_path / 'text.txt'}}}\n"
        + TINY.replace("}\n", ", early_stop: {patience: 1, min_delta: 100}, warmup_steps: 0}\n")
        + f"tracking: {{uri: '{db}'}}\n"
    )
    (tmp_path / "text.txt").write_text(
        "".join(f"line {i}: to be or not to be\n" for i in range(400))
    )
    result = run_cli("train", spec, "--no-progress", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Evals at 2 (the first best) and 4 (no better: patience spent), but 4 is max_steps.
    assert "early stop" not in result.stdout + result.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stop_reason"] == "max_steps" and info["summary"]["steps"] == 4
    client = MlflowClient(db)
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.tags["gptkit.stop_reason"] == "max_steps"
    prepared = run_cli("prepare", spec, "--json", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    sha = json.loads(prepared.stdout)["content_sha256"]
    assert len(sha) == 64 and int(sha, 16)
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert dataset.digest == sha[:36] and json.loads(dataset.profile)["sha256"] == sha

    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    again = run_cli("train", "--resume", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to train" in again.stdout
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == (run.info.status, run.info.end_time)
    assert after.data.tags == run.data.tags
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    # A change given to a resume that trains nothing is not said to be made (it was printed
    # as "resume changes ...", though nothing was stored)
    changed = run_cli(
        "train", "--resume", "--run-dir", tmp_path / "run", "--set", "data.val_fraction=0.2",
        cwd=tmp_path,
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    assert "nothing to train" in changed.stdout and "resume changes" not in changed.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
