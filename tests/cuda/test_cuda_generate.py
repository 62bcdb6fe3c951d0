"""Generation on a CUDA GPU: decode steps replayed from CUDA graphs give the tokens and logits
of the model run step by step. Skipped where there is no GPU (CI has none)."""

import pytest
import torch

from gptkit import testing
from gptkit.inference.torch import TorchBackend
from gptkit.testing.models import _greedy_ids, _Recording

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("attention", "positional"), [("mha", "learned"), ("gqa", "rope")])
def test_graphed_decode_steps_match_the_model_run_step_by_step(attention, positional):
    model = testing.tiny_model(attention, positional, max_seq_len=24).cuda()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    steps = 40  # past the context (24): rows are cropped and prefilled again, new buffers
    graphed = _Recording(TorchBackend(model, "cuda"))
    graphed.backend.capture_after = 0  # every set of cache buffers gets its graph at once
    eager = _Recording(TorchBackend(model, "cuda", graphs=False))
    assert graphed.backend.graphs and not eager.backend.graphs
    # Rows joining a running batch (new cache buffers): a new graph each time.
    join_at = [0, 3, 7]
    assert _greedy_ids(graphed, prompts, steps, join_at) == _greedy_ids(
        eager, prompts, steps, join_at
    )
    assert graphed.backend.graphs, "graphs were turned off (a capture failed or disagreed)"
    assert graphed.backend.step is not None and graphed.backend.step.graph is not None
    for x, y in zip(graphed.logits, eager.logits):
        assert abs(x - y).max() < 1e-3


def test_gptkit_cuda_graphs_0_turns_graphs_off(monkeypatch):
    model = testing.tiny_model("mha", "learned", max_seq_len=24).cuda()
    assert TorchBackend(model, "cuda").graphs
    monkeypatch.setenv("GPTKIT_CUDA_GRAPHS", "0")
    assert not TorchBackend(model, "cuda").graphs
    assert TorchBackend(model, "cuda", graphs=True).graphs  # asked for by name
