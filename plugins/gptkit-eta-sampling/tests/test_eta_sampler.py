import numpy as np

from gptkit.registry.registry import load_registry
from gptkit.testing.samplers import check_sampler


def eta(**fields):
    return load_registry().get("sampler", "eta").model_validate({"kind": "eta", **fields})


def test_gptkit_sampler_contract():
    check_sampler(eta(epsilon=0.02))


def test_threshold_follows_the_paper():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.04, 0.01]]))
    p = np.exp(logits)
    entropy = -(p * np.log(p)).sum()
    s = eta(epsilon=0.05)
    expected = min(0.05, np.sqrt(0.05) * np.exp(-entropy))
    probs = s.probs(logits)[0]
    assert (probs[p[0] <= expected] == 0).all() and (probs[p[0] > expected] > 0).all()


def test_flat_distribution_keeps_more_than_a_peaked_one():
    flat = np.zeros((1, 50))
    peaked = flat.copy()
    peaked[0, 0] = 8.0
    s = eta(epsilon=0.01)
    assert (s.probs(flat) > 0).sum() > (s.probs(peaked) > 0).sum()
