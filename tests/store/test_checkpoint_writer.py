"""Checkpoints written beside training (``gptkit.store.writer``): what is written is the state
at the moment of the checkpoint, training does not wait for the files, and a write that fails
stops the run with the last good checkpoint intact."""

import threading

import pytest
import torch
from safetensors.torch import load_file

import gptkit.store.writer as writer_module
from gptkit.errors import RunError
from gptkit.spec.files import load_spec
from gptkit.store.checkpoint import read_pointer, save_checkpoint
from gptkit.store.writer import CheckpointWriter, host_copy
from gptkit.training.loop import SpecTrainer
from tests.conftest import ROOT

SMOKE = ROOT / "experiments" / "smoke.yaml"


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _train_one_step(model, opt):
    model(torch.randn(3, 8)).sum().backward()
    opt.step()


def _never_fail(exc, step):
    raise AssertionError(f"step {step} failed: {exc}")


def test_the_checkpoint_holds_the_state_of_when_it_was_asked_for(tmp_path, monkeypatch):
    """The write is held back until training has changed weights and optimizer state twice:
    the files still hold the state at ``submit``, and ``submit`` returned before the write."""
    model, opt = _model_and_optimizer()
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = opt.state_dict()["state"][0]["exp_avg"].clone()
    release, started = threading.Event(), threading.Event()

    def held_back(*args):
        started.set()
        assert release.wait(30)
        return save_checkpoint(*args)

    monkeypatch.setattr(writer_module, "save_checkpoint", held_back)
    writer = CheckpointWriter(_never_fail)
    state = {"step": 1, "optimizer": opt.state_dict()}
    writer.submit(tmp_path / "ckpt", 1, model, state, {"val_loss": 1.0}, keep_last=2)
    assert started.wait(30) and writer.busy  # submit came back; the write is under way
    for _ in range(2):
        _train_one_step(model, opt)
    assert not torch.equal(model[0].weight, expected_weights["0.weight"])
    release.set()
    path = writer.wait()
    assert path == tmp_path / "ckpt" / "step-000001"
    saved = load_file(path / "model.safetensors")
    assert saved.keys() == expected_weights.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected_weights.items())
    saved_state = torch.load(path / "state.pt", weights_only=True)
    assert torch.equal(saved_state["optimizer"]["state"][0]["exp_avg"], expected_moment)
    assert read_pointer(tmp_path / "ckpt" / "latest") == "step-000001"


def test_the_host_copy_is_reused_and_follows_the_model(tmp_path):
    model, opt = _model_and_optimizer()
    writer = CheckpointWriter(_never_fail)
    for step in (1, 2, 3):
        writer.submit(tmp_path, step, model, {"step": step}, {"val_loss": 1.0}, keep_last=5)
        first = writer.wait()
        assert first is not None
        saved = load_file(first / "model.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
        _train_one_step(model, opt)
    assert writer._shadow is not None and writer._shadow is not model


def test_host_copy_copies_every_tensor_in_nested_state():
    t = torch.ones(3)
    state = {"a": [t, (t, 2)], "b": {"c": t}, "d": "x"}
    copied = host_copy(state)
    t.add_(1)
    assert copied["a"][0].tolist() == [1, 1, 1] and copied["a"][1][0].tolist() == [1, 1, 1]
    assert copied["b"]["c"].tolist() == [1, 1, 1] and copied["a"][1][1] == 2
    assert isinstance(copied["a"][1], tuple) and copied["d"] == "x"


def test_a_failed_write_is_raised_by_the_next_call_and_the_last_good_one_is_kept(tmp_path):
    model, opt = _model_and_optimizer()
    ckpt = tmp_path / "ckpt"
    writer = CheckpointWriter(lambda exc, step: RunError(f"step {step}: {type(exc).__name__}"))
    writer.submit(ckpt, 1, model, {"step": 1}, {"val_loss": 1.0}, keep_last=2)
    assert writer.wait() == ckpt / "step-000001"
    good = (ckpt / "step-000001" / "model.safetensors").read_bytes()
    # A real failure: the folder the next checkpoint goes into is now a plain file.
    ckpt.rename(tmp_path / "moved")
    ckpt.write_text("not a folder")
    writer.submit(ckpt, 2, model, {"step": 2}, {"val_loss": 0.5}, keep_last=2)
    with pytest.raises(RunError, match="step 2: FileExistsError"):
        for _ in range(3000):  # check() never waits: poll until the write has failed
            writer.check()
            threading.Event().wait(0.01)
    writer.wait()  # reported once: the writer is usable again
    assert (tmp_path / "moved" / "step-000001" / "model.safetensors").read_bytes() == good
    assert read_pointer(tmp_path / "moved" / "latest") == "step-000001"


def test_a_run_whose_checkpoint_write_fails_stops_at_the_next_step(tmp_path):
    """In the loop: the step-8 checkpoint cannot be written (its folder became a file, for
    real); the run stops within the next steps with the exit-2 message, and step 4's
    checkpoint is intact."""
    spec = load_spec(
        SMOKE,
        [
            "train.max_steps=40",
            "train.eval_every=4",
            "train.sample_tokens=0",
            "tracking.enabled=false",
        ],
    )
    run = tmp_path / "run"

    def break_the_folder(step, val):
        if step == 8:  # called after step 8's evaluation, before its checkpoint
            trainer.writer.wait()  # step 4's write, still in flight on a busy machine, done
            (run / "checkpoints").rename(run / "moved")
            (run / "checkpoints").write_text("not a folder")

    trainer = SpecTrainer(spec, run_dir=run, progress=False, on_eval=break_the_folder)
    with pytest.raises(RunError, match="could not write checkpoint step-000008") as err:
        trainer.run()
    assert "Free space or fix permissions" in str(err.value.hint)
    assert trainer.state.step <= 12  # stopped by the next checkpoint at the latest, not at 40
    assert read_pointer(run / "moved" / "latest") == "step-000004"
    assert load_file(run / "moved" / "step-000004" / "model.safetensors")


def test_a_shadow_built_by_a_factory_leaves_the_random_stream_alone(tmp_path):
    """The host copy built at the first checkpoint (a new module, randomly initialised) must
    not draw from torch's random stream: training's dropout after it, and an exact resume,
    depend on that stream."""
    model, _ = _model_and_optimizer()
    writer = CheckpointWriter(
        _never_fail, lambda m: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    )
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    writer.submit(tmp_path, 1, model, {"step": 1}, {"val_loss": 1.0}, keep_last=2)
    assert torch.equal(torch.rand(3), expected)
    path = writer.wait()
    saved = load_file(path / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
