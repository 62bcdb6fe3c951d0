"""With an optimizer that skips a non-finite step on the device (torch's fused AdamW, the default
on CUDA; ``train.optimizer.fused: true`` asks for it anywhere), the trainer reads the loss and
the gradient norm only at steps that log, evaluate or write a checkpoint: on a GPU each read
makes the host wait for every kernel queued before it. The run must be the same run: the same
weights, the same logged losses, the same skipped steps and messages as reading every step."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from gptkit.spec.files import load_spec
from gptkit.training import loop
from gptkit.training.loop import SpecTrainer, TrainingError
from tests.conftest import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"
BASE = [
    "train.optimizer.fused=true",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=6",
    "train.grad_accum_steps=2",
    "train.sample_tokens=0",
    "tracking.enabled=false",
]


def _run(tmp_path: Path, name: str, capsys, *extra: str, defer: bool = True):
    """Train the smoke spec in-process; (trainer, its printed step lines without rates, the
    error it stopped with)."""
    spec = load_spec(SMOKE, [*BASE, *extra])
    trainer = SpecTrainer(spec, run_dir=tmp_path / name, progress=False)
    capsys.readouterr()
    error = None
    with pytest.MonkeyPatch.context() as patch:
        if not defer:  # the same fused optimizer, read every step (as every other one is)
            patch.setattr(loop, "skips_on_device", lambda optimizer: False)
        try:
            trainer.run()
        except TrainingError as exc:
            error = exc.message
    out = capsys.readouterr()
    lines = [re.sub(r" \| [\d,.]+ tok/s.*", "", line) for line in (out.out + out.err).splitlines()]
    return trainer, [line for line in lines if line.startswith("step ")], error


def _weights(trainer: SpecTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_fused_optimizer_leaves_the_loss_on_the_device_until_a_log_step(tmp_path, monkeypatch):
    spec = load_spec(SMOKE, BASE)
    copies: dict[str, list[int]] = {}
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if "gptkit" in Path(caller.co_filename).parts:
                copies.setdefault(caller.co_name, []).append(self.numel())
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer = SpecTrainer(spec, run_dir=tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.defer_reads
    assert "_train_step" not in copies
    # Steps 4, 6 (evaluates), 8, 12: one copy each of its steps' 2 losses and norm.
    assert copies["_read_pending"] == [4 * 3, 2 * 3, 2 * 3, 4 * 3]
    assert trainer.state.tokens_seen == 12 * trainer.tokens_per_step


def test_reading_at_log_steps_trains_and_logs_what_reading_every_step_does(tmp_path, capsys):
    deferred, deferred_lines, error = _run(tmp_path, "deferred", capsys)
    assert error is None and deferred.defer_reads
    every, every_lines, error = _run(tmp_path, "every", capsys, defer=False)
    assert error is None and not every.defer_reads
    assert deferred_lines == every_lines
    logged = [line.split(" |")[0] for line in deferred_lines if "/12 |" in line]
    assert logged == [f"step {s:>6}/12" for s in (4, 8, 12)]
    assert sum("val loss" in line for line in deferred_lines) == 2  # steps 6 and 12
    a, b = _weights(deferred), _weights(every)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert deferred.state.best_val == every.state.best_val
    assert deferred.state.tokens_seen == every.state.tokens_seen


@pytest.mark.parametrize("max_bad", [50, 5])
def test_non_finite_steps_are_skipped_on_the_device_as_the_host_skipped_them(
    tmp_path, capsys, max_bad
):
    # From the first step the learning rate is huge: the loss blows up within a few steps.
    # With max_bad_steps=50 the run reaches max_steps on skipped steps; with 5 it stops at
    # the fifth in a row - named the same way although it is read a few steps later.
    blow_up = ["train.lr=1e25", "train.warmup_steps=0", "train.grad_clip=null"]
    blow_up.append(f"train.max_bad_steps={max_bad}")
    deferred, deferred_lines, deferred_error = _run(tmp_path, "deferred", capsys, *blow_up)
    every, every_lines, every_error = _run(tmp_path, "every", capsys, *blow_up, defer=False)
    assert deferred.defer_reads and not every.defer_reads
    assert any("step skipped" in line for line in deferred_lines)
    assert deferred_lines == every_lines
    assert every_error is not None
    assert deferred_error == every_error.replace("every", "deferred")
    expected = "training ended on" if max_bad == 50 else "5 non-finite steps in a row"
    assert deferred_error is not None and expected in deferred_error
    assert deferred.state.skipped == every.state.skipped
    assert deferred.state.tokens_seen == every.state.tokens_seen
    # The weights are the last good step's: a skipped step changed nothing on the device.
    a, b = _weights(deferred), _weights(every)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
