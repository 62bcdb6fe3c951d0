"""The properties every sampler must have: a proper distribution whose draws follow it,
randomness only from the generator it is given, and per-generation state that repeats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.testing.tokenizers import check_torch_free, modules_of


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square (z = 3.09: the 0.1% tail), Wilson-Hilferty."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c**0.5) ** 3


def check_sampler(sampler: Any, vocab: int = 12, draws: int = 40_000, seed: int = 0) -> None:
    """Every sampler property at once (see :func:`sampler_distribution` and the others)."""
    sampler_distribution(sampler, vocab, draws, seed)
    sampler_seeded(sampler)
    sampler_state(sampler)


def _fresh(sampler: Any, rows: int) -> list[Any]:
    return [sampler.new_state() for _ in range(rows)]


def _draw(sampler: Any, logits: Any, rng: Any, states: list[Any]) -> Any:
    from gptkit.inference.decoding import sample_next

    contexts = [[0] for _ in range(len(logits))]  # repetition penalty sees one token
    return sample_next(sampler, logits, rng, contexts, states)


def sampler_distribution(sampler: Any, vocab: int = 12, draws: int = 40_000, seed: int = 0) -> None:
    """A proper distribution, draws only from its support, and an empirical distribution that
    matches ``probs`` (chi-square, 0.1% level). Each draw is the first step of a fresh
    generation (its own new state), so stateful samplers are judged fairly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(4, vocab))
    p = sampler.probs(logits, None, _fresh(sampler, 4))
    assert p.shape == logits.shape and (p >= 0).all(), "probs must be (B, V) and >= 0"
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-9, err_msg="probs rows must sum to 1")
    gen = np.random.default_rng(2)
    for row in range(len(logits)):  # every row: a sampler that mixes rows up is caught
        _check_draws(sampler, logits[row], p[row], gen, draws // len(logits))


def _check_draws(sampler: Any, logits: Any, p: Any, gen: Any, draws: int) -> None:
    """Draws from one row's ``logits`` follow ``p`` (chi-square, 0.1% level)."""
    import numpy as np

    batch = np.repeat(logits[None], 1000, axis=0)
    counts = np.bincount(
        np.concatenate(
            [
                _draw(sampler, batch, gen, _fresh(sampler, 1000))
                for _ in range(max(1, draws // 1000))
            ]
        ),
        minlength=len(logits),
    )
    want = p * counts.sum()
    vocab = len(logits)
    support = want > 0
    dof = int(support.sum()) - 1
    chi2 = float((((counts[support] - want[support]) ** 2) / want[support]).sum())
    if counts[~support].sum() or (dof > 0 and chi2 >= chi2_critical(dof)):
        # Name the cause when it is state carried from one generation into the next.
        assert not _state_leaks(sampler, vocab), (
            "sampler state leaks between generations: the first draw of a fresh generation "
            "depends on earlier generations (keep per-generation state in new_state() objects)"
        )
    assert counts[~support].sum() == 0, "drew a token outside the sampler's support"
    if dof > 0:
        assert chi2 < chi2_critical(dof), (
            f"draws do not follow probs (chi2 {chi2:.1f}): {counts.tolist()} vs "
            f"{want.round(1).tolist()}"
        )


def _state_leaks(sampler: Any, vocab: int) -> bool:
    """Whether a fresh generation's first draw changes after other generations ran."""
    import numpy as np

    logits = np.random.default_rng(7).normal(0, 2, size=(64, vocab))
    before = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, 64))
    for seed in range(5):
        _draw(sampler, logits, np.random.default_rng(100 + seed), _fresh(sampler, 64))
    after = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, 64))
    return bool((before != after).any())


def sampler_seeded(sampler: Any, rows: int = 256, vocab: int = 12) -> None:
    """Randomness comes only from the ``rng`` passed in: the same seed gives the same tokens
    whatever numpy's global RNG holds, and another seed gives other tokens."""
    import numpy as np

    logits = np.random.default_rng(3).normal(0, 1, size=(rows, vocab))
    state = np.random.get_state()
    try:
        np.random.seed(11)
        a = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, rows))
        np.random.seed(12)  # a sampler on the global RNG now draws differently: caught
        b = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, rows))
        c = _draw(sampler, logits, np.random.default_rng(2), _fresh(sampler, rows))
    finally:
        np.random.set_state(state)
    assert (a == b).all(), (
        "the same rng seed gave different tokens: the sampler draws from "
        "something besides the rng it is given (numpy's global RNG?)"
    )
    p = sampler.probs(logits, None, _fresh(sampler, rows))
    if (p.max(-1) < 1 - 1e-9).any():  # not a deterministic sampler such as greedy
        assert (a != c).any(), "a different rng seed gave the same tokens: the rng is ignored"


def sampler_state(sampler: Any, rows: int = 3, steps: int = 40, vocab: int = 12) -> None:
    """Per-generation state: ``new_state`` gives a separate object per row, and a generation
    of ``steps`` steps with fresh states and the same seed repeats exactly."""
    import numpy as np

    fresh = _fresh(sampler, 2)
    if fresh[0] is not None:
        assert fresh[0] is not fresh[1], "new_state() must return a new object per row"

    def generation() -> list[list[int]]:
        rng, states = np.random.default_rng(5), _fresh(sampler, rows)
        logits_rng = np.random.default_rng(6)
        return [
            _draw(sampler, logits_rng.normal(0, 2, size=(rows, vocab)), rng, states).tolist()
            for _ in range(steps)
        ]

    assert generation() == generation(), (
        "sampler state leaks between generations: a seeded generation with fresh states did "
        "not repeat"
    )


def run_sampler_case(case: Any, example: Any, registry: Any, folder: Path) -> None:
    if case.prop == "torch_free":
        for module in modules_of(registry, case):
            check_torch_free(module)
    elif case.prop == "distribution":
        sampler_distribution(example.build())
    elif case.prop == "seeded":
        sampler_seeded(example.build())
    elif case.prop == "state":
        sampler_state(example.build())
