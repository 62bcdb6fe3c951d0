"""The decode step a CUDA graph replays (``GraphedStep``), run on the CPU: the same tokens and
logits as the eager static path, captured only for cache buffers that have served a few steps,
and a step whose replay disagrees with the model turns graphs off without losing a token."""

import gc
import warnings

import numpy as np
import pytest

from gptkit import testing
from gptkit.inference import torch as torch_backend
from gptkit.inference.torch import TorchBackend
from gptkit.testing.models import _greedy_ids, _Recording

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
JOIN_AT = [0, 3, 7]  # rows joining a running batch: new cache buffers each time
STEPS = 40  # past the context (24): rows are cropped and prefilled again


def _decode(backend):
    recording = _Recording(backend)
    return _greedy_ids(recording, PROMPTS, STEPS, JOIN_AT), recording.logits


@pytest.mark.parametrize(
    ("attention", "positional"), [("gqa", "rope"), ("sliding_window", "alibi")]
)
def test_fixed_shape_steps_decode_what_the_eager_static_path_does(attention, positional):
    model = testing.tiny_model(attention, positional, max_seq_len=24)
    graphed = TorchBackend(model, graphs=True)
    graphed.capture_after = 0  # every decode step by a GraphedStep
    tokens, logits = _decode(graphed)
    eager_tokens, eager_logits = _decode(TorchBackend(model, graphs=False))
    assert tokens == eager_tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, eager_logits)) < 1e-5
    assert graphed.graphs and graphed.step is not None  # the last buffers got their step


def test_a_step_is_made_only_for_buffers_that_served_a_few_steps():
    model = testing.tiny_model("mha", "learned", max_seq_len=24)
    backend = TorchBackend(model, graphs=True)
    made = []
    original = torch_backend.GraphedStep.__init__

    def counted(self, *args, **kwargs):
        made.append(len(args[1].buffers[0]))  # the batch size it serves
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_backend.GraphedStep, "__init__", counted)
        _decode(backend)
    # Rows join at steps 3 and 7 and are cropped at the context: each set of buffers serves
    # 3 steps directly first, so fewer steps are made than there are buffer changes + 1.
    assert 0 < len(made) < 6


def test_a_replay_that_disagrees_turns_graphs_off_and_no_token_is_lost():
    model = testing.tiny_model("mha", "rope", max_seq_len=24)
    eager_tokens, _ = _decode(TorchBackend(model, graphs=False))
    backend = TorchBackend(model, graphs=True)
    backend.capture_after = 0
    original = torch_backend.GraphedStep._replay

    def wrong(self):  # as a capture that recorded something else would replay
        return original(self) + 1.0

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(torch_backend.GraphedStep, "_replay", wrong)
        tokens, _ = _decode(backend)
    assert tokens == eager_tokens
    assert not backend.graphs and backend.step is None
    assert any("decoding without CUDA graphs" in str(w.message) for w in caught)
    assert any("differ from the model's" in str(w.message) for w in caught)


def test_a_step_kept_after_its_batch_does_not_keep_the_batch_s_cache():
    model = testing.tiny_model("mha", "rope", max_seq_len=24)
    backend = TorchBackend(model, graphs=True)
    backend.capture_after = 0
    _decode(backend)  # the batch and its cache are gone when it returns
    gc.collect()
    assert backend.step is not None
    assert all(ref() is None for ref in backend.step.cache_refs)
