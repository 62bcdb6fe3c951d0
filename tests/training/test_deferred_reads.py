"""With an optimizer that skips a non-finite step on the device (torch's fused AdamW, the default
on CUDA; ``train.optimizer.fused: true`` asks for it anywhere), the trainer reads the loss and
the gradient norm only at steps that log, evaluate or write a checkpoint: on a GPU each read
makes the host wait for every kernel queued before it. The run must be the same run: the same
weights, the same logged losses, the same skipped steps and messages as reading every step.

Each test runs on the CPU and, where there is one, on a CUDA GPU."""

from __future__ import annotations

import json
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
# Reads at steps 3 (checkpoint), 4 (log), 6 (evaluation, checkpoint), 8, 9, 12 (the last).
BASE = [
    "train.optimizer.fused=true",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=6",
    "train.checkpoint_every=3",
    "train.keep_last=10",
    "train.grad_accum_steps=2",
    "train.sample_tokens=0",
    "tracking.enabled=false",
]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


class _Faulty(SpecTrainer):
    """A trainer whose model's logits are NaN in the forward passes of the given steps (1 is
    the first), evaluations included: a loss that blows up exactly there."""

    def __init__(self, *args, bad_steps=(), fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps, self.fail_at = set(bad_steps), fail_at

    def _build_model(self):
        model = super()._build_model()

        def poison(module, inputs, output):
            state = getattr(self, "state", None)
            taking = state.step + 1 if state is not None else 0
            if taking == self.fail_at:
                raise RuntimeError(f"a simulated failure in step {taking}")
            return output * float("nan") if taking in self.bad_steps else output

        model.lm_head.register_forward_hook(poison)
        return model


def _run(
    tmp_path: Path, name: str, capsys, device: str, *extra: str, defer=True, bad=(), fail_at=None
):
    """Train the smoke spec in-process; (trainer, its printed step lines without rates, the
    error it stopped with)."""
    spec = load_spec(SMOKE, [*BASE, f"train.device={device}", *extra])
    trainer = _Faulty(spec, run_dir=tmp_path / name, progress=False, bad_steps=bad, fail_at=fail_at)
    capsys.readouterr()
    error = None
    with pytest.MonkeyPatch.context() as patch:
        if not defer:  # the same fused optimizer, read every step (as every other one is)
            patch.setattr(loop, "skips_on_device", lambda optimizer: False)
        try:
            trainer.run()
        except TrainingError as exc:
            error = exc.message.replace(str(tmp_path / name), "RUN")
        except RuntimeError as exc:
            error = str(exc)
    out = capsys.readouterr()
    lines = [re.sub(r" \| [\d,.]+ tok/s.*", "", line) for line in (out.out + out.err).splitlines()]
    return trainer, [line for line in lines if line.startswith("step ")], error


def _same_weights(a: SpecTrainer, b: SpecTrainer) -> None:
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_cuda:  # CUDA's attention backward need not be bit-reproducible
            torch.testing.assert_close(wa[k], wb[k])
        else:
            assert torch.equal(wa[k], wb[k]), k


def _checkpoints(trainer: SpecTrainer) -> dict[str, bytes]:
    folder = trainer.run_dir / "checkpoints"
    return {p.parent.name: p.read_bytes() for p in sorted(folder.glob("step-*/model.safetensors"))}


@pytest.mark.parametrize("device", DEVICES)
def test_a_fused_optimizer_leaves_the_loss_on_the_device_until_a_read_step(
    tmp_path, monkeypatch, device
):
    spec = load_spec(SMOKE, [*BASE, f"train.device={device}"])
    copies: dict[str, list[int]] = {}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
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
    for function in ("_train_step", "_gradients", "_step_on_device", "_steps"):
        assert function not in copies, copies
    # One copy per read, of its steps' 2 losses and norm each: steps 1-3, 4, 5-6, 7-8, 9, 10-12.
    assert copies["_read_pending"] == [3 * 3, 1 * 3, 2 * 3, 2 * 3, 1 * 3, 3 * 3]
    assert trainer.state.tokens_seen == 12 * trainer.tokens_per_step


@pytest.mark.parametrize("device", DEVICES)
def test_reading_at_log_steps_trains_logs_and_checkpoints_what_reading_every_step_does(
    tmp_path, capsys, device
):
    deferred, deferred_lines, error = _run(tmp_path, "deferred", capsys, device)
    assert error is None and deferred.defer_reads
    every, every_lines, error = _run(tmp_path, "every", capsys, device, defer=False)
    assert error is None and not every.defer_reads
    assert deferred_lines == every_lines
    logged = [line.split(" |")[0] for line in deferred_lines if "/12 |" in line]
    assert logged == [f"step {s:>6}/12" for s in (4, 8, 12)]
    assert sum("val loss" in line for line in deferred_lines) == 2  # steps 6 and 12
    _same_weights(deferred, every)
    assert deferred.state.best_val == every.state.best_val
    assert deferred.state.tokens_seen == every.state.tokens_seen
    written = _checkpoints(deferred)
    assert list(written) == [f"step-{s:06d}" for s in (3, 6, 9, 12)]
    if device == "cpu":
        assert written == _checkpoints(every)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("bad", "extra", "expected"),
    [
        # One step blows up between two reads; the steps after it are good: it is skipped,
        # on the device, and the optimizer's step count (Adam's bias correction) is intact.
        ((5,), [], None),
        # Two in a row with max_bad_steps=2: the run stops at step 7, read at step 8 - named,
        # counted and left on disk as reading every step does. (Step 8, good, was applied in
        # memory before the read; the run failed, and nothing after step 6 was written.)
        ((6, 7), ["train.max_bad_steps=2"], "training stopped at step 7: 2 non-finite steps"),
        # From step 4 to the end with max_bad_steps=50: the run ends on skipped steps.
        (range(4, 13), ["train.max_bad_steps=50"], "training ended on 9 non-finite step(s)"),
    ],
)
def test_non_finite_steps_are_skipped_on_the_device_as_the_host_skipped_them(
    tmp_path, capsys, device, bad, extra, expected
):
    deferred, deferred_lines, deferred_error = _run(
        tmp_path, "deferred", capsys, device, *extra, bad=bad
    )
    every, every_lines, every_error = _run(
        tmp_path, "every", capsys, device, *extra, defer=False, bad=bad
    )
    assert deferred.defer_reads and not every.defer_reads
    assert [line for line in deferred_lines if "step skipped" in line] == [
        f"step {s}: non-finite loss or gradient (nan, nan); step skipped"
        for s in sorted(bad)
        if expected is None or "stopped" not in expected or s <= 7
    ]
    assert deferred_lines == every_lines
    assert deferred_error == every_error
    assert (deferred_error is None) == (expected is None)
    assert expected is None or expected in deferred_error
    for name in ("step", "skipped", "tokens_seen", "best_val"):
        assert getattr(deferred.state, name) == getattr(every.state, name), name
    # The weights are the last good step's: a skipped step changed nothing on the device.
    if expected is None or "stopped" not in expected:
        _same_weights(deferred, every)
    assert all(torch.isfinite(v).all() for v in deferred.model.state_dict().values())
    if device == "cpu":
        assert _checkpoints(deferred) == _checkpoints(every)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_failure_between_reads_still_counts_the_steps_taken(tmp_path, capsys, device):
    # Step 11 fails in its forward pass; step 10 was taken but not read yet (reads: 9, 12).
    deferred, _, error = _run(tmp_path, "deferred", capsys, device, fail_at=11)
    assert error == "a simulated failure in step 11"
    every, _, _ = _run(tmp_path, "every", capsys, device, defer=False, fail_at=11)
    assert deferred.pending == []
    for name in ("step", "skipped", "tokens_seen"):
        assert getattr(deferred.state, name) == getattr(every.state, name), name
    assert deferred.state.tokens_seen == 10 * deferred.tokens_per_step
    summaries = [json.loads((t.run_dir / "run.json").read_text()) for t in (deferred, every)]
    assert summaries[0]["summary"]["total_tokens"] == summaries[1]["summary"]["total_tokens"]


@pytest.mark.slow
def test_a_run_resumed_with_another_adamw_implementation_uses_the_new_one(tmp_path):
    """The implementation (fused or not) is the session's, not the checkpoint's: a run begun
    unfused (as on the CPU) and resumed fused (as on CUDA) reads at log steps, and the other
    way round reads every step."""
    first = [*BASE[1:], "train.max_steps=6"]
    SpecTrainer(load_spec(SMOKE, first), run_dir=tmp_path / "a", progress=False).run()
    resumed = SpecTrainer(
        load_spec(SMOKE, BASE), run_dir=tmp_path / "a", resume=True, progress=False
    )
    resumed.run()
    assert resumed.defer_reads and resumed.state.step == 12
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    SpecTrainer(load_spec(SMOKE, [*BASE, "train.max_steps=6"]), run_dir=tmp_path / "b").run()
    back = SpecTrainer(
        load_spec(SMOKE, ["train.optimizer.fused=false", *BASE[1:]]),
        run_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    back.run()
    assert not back.defer_reads and back.state.step == 12
    assert not any(g["fused"] for g in back.optimizer.param_groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_between_reads_does_not_wait_for_the_gpu(tmp_path, monkeypatch):
    """torch's sync debug mode raises on any operation that makes the host wait for the GPU:
    none may happen in a step that is not read (the first, which creates the optimizer's
    state, aside)."""
    step = SpecTrainer._train_step

    def strict(self, lr):
        if self.state.step == 0:
            return step(self, lr)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, lr)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(SpecTrainer, "_train_step", strict)
    spec = load_spec(SMOKE, [*BASE, "train.device=cuda"])
    trainer = SpecTrainer(spec, run_dir=tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.defer_reads and trainer.state.step == 12
