"""A run's "done" line says where its time went besides the training steps: evaluation, the
in-run samples, the checkpoint writes the loop waited for, and the MLflow record's closing."""

from __future__ import annotations

import json
import re
import time

import pytest

from gptkit.cli.train import _train_report
from gptkit.spec.files import load_spec
from gptkit.training import loop
from gptkit.training.loop import SpecTrainer
from tests.conftest import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"
BASE = ["train.max_steps=6", "train.eval_every=3", "tracking.enabled=false"]


def _run(tmp_path, *overrides):
    spec = load_spec(SMOKE, [*BASE, *overrides])
    return SpecTrainer(spec, run_dir=tmp_path / "run", progress=False).run()


def test_each_phase_is_counted_where_it_happens(tmp_path, monkeypatch):
    real = loop.progress_sample

    def slow_sample(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "progress_sample", slow_sample)
    result = _run(tmp_path, "train.sample_tokens=4")
    phases = result.phases
    assert set(phases) == {"evaluation", "samples", "checkpoints", "tracking"}
    assert phases["samples"] >= 0.4  # two evaluations, each followed by a sample
    assert phases["evaluation"] > 0 and phases["checkpoints"] > 0
    assert phases["evaluation"] < 0.4  # the samples' sleep is not counted as evaluation
    assert sum(phases.values()) < result.elapsed

    line = _train_report(result).splitlines()[0]
    shares = re.search(r"in ([\d.]+)s \(steps ([\d.]+)s, (.*)\), val loss", line)
    assert shares, line
    assert "samples " in shares[3]
    named = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", shares[3])}
    # The parts add up to the whole (each is rounded to a tenth).
    assert abs(float(shares[2]) + sum(named.values()) - float(shares[1])) <= 0.05 * (len(named) + 2)


def test_no_samples_no_sample_time(tmp_path):
    result = _run(tmp_path, "train.sample_tokens=0")
    assert result.phases["samples"] == 0.0
    assert "samples" not in _train_report(result).splitlines()[0]


def test_the_records_closing_is_its_own_part_and_not_in_the_rate(tmp_path, monkeypatch):
    """Closing the MLflow run (plot, artifacts) was counted as training steps, and in the
    tokens/s, which then disagreed with run.json's summary."""
    from gptkit.training.record import RunRecord

    real = RunRecord.close

    def slow_close(self, *args, **kwargs):
        time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunRecord, "close", slow_close)
    spec = load_spec(
        SMOKE,
        [*BASE[:2], "train.sample_tokens=0", f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}"],
    )
    result = SpecTrainer(spec, run_dir=tmp_path / "run", progress=False).run()
    assert result.phases["tracking"] >= 0.5
    assert re.search(r"tracking 0\.[5-9]s|tracking [1-9]", _train_report(result)), result
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    assert abs(result.tokens_per_sec / summary["tokens_per_sec"] - 1) < 0.1, summary


@pytest.mark.slow  # trains
def test_with_tracking_off_the_records_closing_is_not_called_tracking(tmp_path, monkeypatch):
    from gptkit.training.record import RunRecord

    real = RunRecord.close

    def slow_close(self, *args, **kwargs):
        time.sleep(0.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunRecord, "close", slow_close)
    line = _train_report(_run(tmp_path, "train.sample_tokens=0")).splitlines()[0]
    assert re.search(r"record 0\.[5-9]s|record [1-9]", line) and "tracking" not in line, line


@pytest.mark.slow  # sets up two trainers
def test_a_ctrl_c_before_the_first_step_is_said_and_leaves_no_empty_folder(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C in the first seconds of `gptkit train` exited 130 with nothing said, leaving
    an empty run folder."""
    import pytest

    from gptkit.cli import main
    from gptkit.training.loop import Interrupted

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpecTrainer, "_build_model", interrupted)  # after the folder's lock
    spec = load_spec(SMOKE, BASE)
    trainer = SpecTrainer(spec, run_dir=tmp_path / "run", progress=False)
    with pytest.raises(Interrupted, match="being set up: nothing was trained"):
        trainer.run()
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made for the run is theirs: kept
    trainer = SpecTrainer(spec, run_dir=tmp_path / "mine", progress=False)
    with pytest.raises(Interrupted):
        trainer.run()
    assert (tmp_path / "mine").is_dir()

    import gptkit.spec.files as files

    monkeypatch.setattr(files, "compose_spec_file", lambda *a, **k: interrupted(None))
    with pytest.raises(SystemExit) as info:  # a bare Ctrl-C anywhere in a command
        main(["validate", str(SMOKE)])
    assert info.value.code == 130 and "gptkit: interrupted" in capsys.readouterr().err
