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


def check_sampler(sampler: Any, vocab: int = 64, draws: int = 40_000, seed: int = 0) -> None:
    """Every sampler property at once (see :func:`sampler_distribution` and the others)."""
    sampler_distribution(sampler, vocab, draws, seed)
    sampler_seeded(sampler)
    sampler_state(sampler)


def _fresh(sampler: Any, rows: int) -> list[Any]:
    return [sampler.new_state() for _ in range(rows)]


def _draw(sampler: Any, logits: Any, rng: Any, states: list[Any]) -> Any:
    from gptkit.errors import PluginError
    from gptkit.inference.decoding import sample_next

    contexts = [[0] for _ in range(len(logits))]  # repetition penalty sees one token
    try:
        return sample_next(sampler, logits, rng, contexts, states)
    except PluginError as exc:  # ids that are not one per row in [0, V): the contract's words
        raise AssertionError(exc.message) from None


def sampler_distribution(sampler: Any, vocab: int = 64, draws: int = 40_000, seed: int = 0) -> None:
    """A proper distribution, checked against an independent reference, and draws that follow
    it (chi-square, 0.1% level), on every one of 4 rows of ``vocab`` logits.

    The reference (:func:`reference_probs`): for a built-in kind, or a subclass of one (which
    keeps its kind's meaning), that kind's definition computed plainly; so a wrong
    ``truncate`` is caught even though ``probs`` and ``sample`` both use it. The vocabulary
    is large enough that the example values truncate (top_k's k < vocab). For a new kind that
    uses the base ``probs``, its ``truncate`` may only remove tokens: on what it keeps,
    ``probs`` is the softmax of the adjusted logits. A sampler that replaces ``probs`` is held
    to its own ``probs``. Each draw is the first step of a fresh generation (its own new
    state), so stateful samplers are judged fairly. ``temperature`` and
    ``repetition_penalty`` must change ``probs`` (:func:`_check_honours_options`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(4, vocab))
    previous = np.zeros((4, 1), dtype=np.int64)  # the one token _draw's contexts hold
    p = sampler.probs(logits, previous, _fresh(sampler, 4))
    assert p.shape == logits.shape and (p >= 0).all(), "probs must be (B, V) and >= 0"
    sums = p.sum(-1)
    assert np.allclose(sums, 1.0, atol=1e-9), f"probs rows must sum to 1 (they sum to {sums})"
    want = reference_probs(sampler, logits, previous)
    if want is not None:
        _check_against_reference(sampler, p, want)
    else:
        want = p
        if type(sampler).probs is _base_probs():
            _check_truncation_only_removes(sampler, logits, previous, p)
    _check_honours_options(sampler, logits)
    gen = np.random.default_rng(2)
    for row in range(len(logits)):  # every row: a sampler that mixes rows up is caught
        _check_draws(sampler, logits[row], want[row], gen, draws // len(logits))


def _check_honours_options(sampler: Any, logits: Any) -> None:
    """``temperature`` and ``repetition_penalty``, every sampler's fields, change what
    ``probs`` gives (a new kind's own ``probs`` or ``adjust`` must apply them, as the base
    ``adjust`` does), unless it picks one token per row whatever they are. The penalised
    token is each row's likeliest, which no truncation removes."""
    import numpy as np

    previous = logits.argmax(-1)[:, None]

    def probs(**change: float) -> Any:  # built as gptkit builds it: validated
        changed = type(sampler).model_validate({**sampler.model_dump(), **change})
        return changed.probs(logits, previous, _fresh(changed, len(logits)))

    if np.isin(probs(), (0.0, 1.0)).all():
        return  # one token per row: nothing for the options to sharpen or flatten
    for field, low, high in (("temperature", 0.5, 2.0), ("repetition_penalty", 1.0, 3.0)):
        if field in type(sampler).model_fields and np.allclose(
            probs(**{field: low}), probs(**{field: high}), rtol=0, atol=1e-12
        ):
            raise AssertionError(
                f"probs() is the same at {field} {low} and {high}: the sampler ignores its "
                f"{field} (the base adjust() applies it; a sampler that replaces probs() or "
                "adjust() must apply it too)"
            )


def _base_probs() -> Any:
    from gptkit.components.base import SamplerSpec

    return SamplerSpec.probs


def _check_against_reference(sampler: Any, p: Any, want: Any) -> None:
    import numpy as np

    kind = _reference_kind(sampler)
    if kind not in ("temperature", "greedy"):
        assert (want == 0).any(), (
            f"the {kind} sampler's values truncate nothing on a {want.shape[-1]}-token "
            "vocabulary, so truncation is not tested: give its fields examples=[...] that do"
        )
    for row, (got, ref) in enumerate(zip(p, want)):
        if not np.allclose(got, ref, rtol=0, atol=1e-9):
            raise AssertionError(
                f"row {row}: probs() is not the {kind} distribution (an independent reference "
                f"of the kind): it keeps tokens {np.flatnonzero(got).tolist()} where the "
                f"reference keeps {np.flatnonzero(ref).tolist()} (largest difference "
                f"{float(abs(got - ref).max()):.3g})"
            )


def _check_truncation_only_removes(sampler: Any, logits: Any, previous: Any, p: Any) -> None:
    import numpy as np

    full = _softmax(_reference_adjust(sampler, logits, previous))
    for row, (got, q) in enumerate(zip(p, full)):
        kept = got > 0
        want = np.where(kept, q, 0.0) / q[kept].sum()
        assert np.allclose(got, want, rtol=0, atol=1e-9), (
            f"row {row}: on the tokens it keeps, probs() is not the softmax of the adjusted "
            "logits: truncate() must only set excluded tokens to -inf, leaving the rest as "
            "they are"
        )


def _softmax(x: Any) -> Any:
    import numpy as np

    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference_adjust(sampler: Any, logits: Any, previous: Any) -> Any:
    """Repetition penalty (CTRL: a seen token's logit divided by the penalty if positive,
    multiplied if not), then temperature; the sampler's own ``adjust`` if it replaces it."""
    import numpy as np

    from gptkit.components.base import SamplerSpec

    if type(sampler).adjust is not SamplerSpec.adjust:
        return sampler.adjust(logits, previous)
    x = np.array(logits, dtype=np.float64)
    for row, seen in enumerate(previous):
        for token in set(seen.tolist()):
            v = x[row, token]
            x[row, token] = (
                v / sampler.repetition_penalty if v > 0 else v * sampler.repetition_penalty
            )
    return x / sampler.temperature


def _reference_kind(sampler: Any) -> str | None:
    """The built-in kind whose definition ``sampler`` must follow: its own or its nearest
    built-in ancestor's; "temperature" for a sampler that changes neither ``truncate`` nor
    ``probs``; None for a new kind."""
    from gptkit.components import samplers as builtin
    from gptkit.components.base import SamplerSpec

    for cls in type(sampler).__mro__:
        if cls.__module__ == builtin.__name__ and issubclass(cls, SamplerSpec):
            return str(cls.model_fields["kind"].default)
    cls = type(sampler)
    if cls.truncate is SamplerSpec.truncate and cls.probs is SamplerSpec.probs:
        return "temperature"
    return None


def _keep(kind: str, p: list[float], sampler: Any) -> set[int]:
    """The tokens ``kind`` keeps from one row's probabilities ``p``, as its paper defines
    them: sorting and adding up, one token at a time."""
    import math

    ranked = sorted(range(len(p)), key=lambda i: -p[i])
    if kind == "greedy":
        return {ranked[0]}
    if kind == "top_k":
        return set(ranked[: sampler.k])
    if kind == "min_p":
        return {i for i in ranked if p[i] >= sampler.p * p[ranked[0]]}
    if kind in ("top_p", "typical"):
        if kind == "typical":
            entropy = -sum(q * math.log(q) for q in p if q > 0)
            ranked = sorted(range(len(p)), key=lambda i: abs(-math.log(p[i]) - entropy))
        keep, total = set(), 0.0
        for i in ranked:  # until the kept mass reaches p (at least one token)
            if total >= sampler.p:
                break
            keep.add(i)
            total += p[i]
        return keep
    return set(range(len(p)))  # temperature


def reference_probs(sampler: Any, logits: Any, previous: Any = None) -> Any:
    """The distribution ``sampler``'s kind defines for (B, V) ``logits``, computed plainly
    (sorting and adding up, not the sampler's vectorised code): the softmax of the adjusted
    logits over the tokens the kind keeps. None for a kind gptkit does not define."""
    import numpy as np

    kind = _reference_kind(sampler)
    if kind is None:
        return None
    if previous is None:
        previous = np.zeros((len(logits), 0), dtype=np.int64)
    full = _softmax(_reference_adjust(sampler, logits, previous))
    out = np.zeros_like(full)
    for row, q in enumerate(full):
        kept = sorted(_keep(kind, q.tolist(), sampler))
        out[row, kept] = q[kept] / q[kept].sum()
    return out


def _check_draws(sampler: Any, logits: Any, p: Any, gen: Any, draws: int) -> None:
    """Draws from one row's ``logits`` follow ``p`` (chi-square, 0.1% level; the tokens
    expected fewer than 5 times pooled into one cell)."""
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
    rare = support & (want < 5)
    cells = [(counts[support & ~rare], want[support & ~rare])]
    if rare.any():
        cells.append((counts[rare].sum(keepdims=True), want[rare].sum(keepdims=True)))
    got, expected = (np.concatenate(c) for c in zip(*cells))
    dof = len(expected) - 1
    chi2 = float((((got - expected) ** 2) / expected).sum())
    if counts[~support].sum() or (dof > 0 and chi2 >= chi2_critical(dof)):
        # Name the cause when it is state carried from one generation into the next.
        assert not _state_leaks(sampler, vocab), (
            "sampler state leaks between generations: the first draw of a fresh generation "
            "depends on earlier generations (keep per-generation state in new_state() objects)"
        )
    outside = np.flatnonzero(counts * ~support).tolist()
    assert not outside, f"drew a token outside the sampler's support: tokens {outside}"
    if dof > 0:
        assert chi2 < chi2_critical(dof), (
            f"draws do not follow the distribution (chi2 {chi2:.1f}, {dof} dof): "
            f"{counts.tolist()} vs {want.round(1).tolist()}"
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

    if generation() == generation():
        return
    saved = np.random.get_state()  # the same again, numpy's global RNG seeded alike each time
    try:
        np.random.seed(0)
        first = generation()
        np.random.seed(0)
        global_rng = generation() == first
    finally:
        np.random.set_state(saved)
    assert not global_rng, (
        "a seeded generation did not repeat: the sampler draws from numpy's global RNG, not "
        "the rng it is given"
    )
    raise AssertionError(
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
