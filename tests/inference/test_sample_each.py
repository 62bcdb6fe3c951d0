"""Rows drawn together (``sample_each``, ``sample_rows``) get exactly the tokens each row gets
drawn alone through ``sample_next``, for every built-in sampler and for a plugin sampler."""

from typing import Literal

import numpy as np
import pytest

from gptkit.components import samplers
from gptkit.components.base import SamplerSpec
from gptkit.inference.decoding import (
    Processing,
    Row,
    _TextStream,
    sample_each,
    sample_next,
    sample_rows,
)

KINDS = [
    samplers.GreedySpec(),
    samplers.TemperatureSpec(temperature=0.7),
    samplers.TopKSpec(k=5),
    samplers.TopPSpec(p=0.8, repetition_penalty=1.3),
    samplers.MinPSpec(p=0.1),
    samplers.TypicalSpec(p=0.7),
]


def _alone(sampler, logits, seeds, contexts):
    return [
        int(
            sample_next(
                sampler,
                logits[i : i + 1],
                np.random.default_rng(s),
                [contexts[i]],
                [sampler.new_state()],
            )[0]
        )
        for i, s in enumerate(seeds)
    ]


@pytest.mark.parametrize("sampler", KINDS, ids=lambda s: s.kind)
def test_rows_drawn_together_get_the_tokens_they_get_alone(sampler):
    gen = np.random.default_rng(0)
    for trial in range(200):
        rows = int(gen.integers(1, 9))
        logits = gen.normal(0, 3, size=(rows, 65)).astype(np.float32)
        contexts = [
            gen.integers(0, 65, size=int(gen.integers(1, 12))).tolist() for _ in range(rows)
        ]
        seeds = [[trial, i] for i in range(rows)]
        together = sample_each(
            sampler,
            logits,
            [np.random.default_rng(s) for s in seeds],
            contexts,
            [None] * rows,
        )
        assert together == _alone(sampler, logits, seeds, contexts), (trial, rows)


class Halves(SamplerSpec):
    """A plugin's sampler (not a built-in): called row by row."""

    kind: Literal["halves"] = "halves"

    def truncate(self, logits):
        return np.where(logits < np.median(logits, axis=-1, keepdims=True), -np.inf, logits)


def test_rows_with_different_samplers_and_processing_are_drawn_each_as_alone():
    gen = np.random.default_rng(1)
    chosen = [KINDS[1], KINDS[3], KINDS[1], Halves(), KINDS[3], KINDS[0]]
    bias = Processing(presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 4.0}, logprobs=2)
    for step in range(30):
        logits = gen.normal(0, 2, size=(len(chosen), 65)).astype(np.float32)
        rows = [
            Row(
                [1, 2],
                s,
                np.random.default_rng([step, i]),
                _TextStream(str, []),
                10,
                processing=bias if i % 2 else None,
                counts={3: 2, 7: 1} if i % 2 else {},
            )
            for i, s in enumerate(chosen)
        ]
        got = sample_rows(rows, logits)
        for i, row in enumerate(rows):
            seen = logits[i : i + 1] if i % 2 == 0 else bias.adjust(logits[i : i + 1], {3: 2, 7: 1})
            want = sample_next(
                row.sampler, seen, np.random.default_rng([step, i]), [[1, 2]], [None]
            )
            assert got[i] == int(want[0]), (step, i)
        assert [len(r.logprobs) for r in rows] == [0, 1, 0, 1, 0, 1]


class _Epsilon(SamplerSpec):
    """Keeps the tokens at least ``epsilon`` likely: at 0.5 over a flat distribution, none."""

    kind: Literal["test_epsilon"] = "test_epsilon"
    epsilon: float = 0.02

    def truncate(self, logits):
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.where(p < self.epsilon, -np.inf, logits)


def test_a_sampler_that_keeps_no_token_is_named_not_drawn_from():
    """Its truncate removed every token: the draw was token 0 every time (20 newlines, exit 0,
    a numpy warning); now an error naming the sampler and its setting."""
    from gptkit.errors import PluginError

    flat = np.zeros((2, 12))
    with pytest.raises(PluginError, match=r"sampler 'test_epsilon' \(epsilon=0.5\) left no token"):
        _Epsilon(epsilon=0.5).sample(flat, np.random.default_rng(0))
    peaked = np.array([[4.0] + [0.0] * 11])
    assert int(_Epsilon(epsilon=0.5).sample(peaked, np.random.default_rng(0))[0]) == 0
    rows = [_Epsilon(epsilon=0.02).sample(flat, np.random.default_rng(s)) for s in range(5)]
    assert len({int(r[0]) for r in rows}) > 1  # a setting that keeps tokens draws as before


def test_a_field_the_sampler_kind_lacks_names_the_kinds_that_have_it():
    """`generate RUN --set sampler.p=2` on a top_k run said pydantic's "Extra inputs are not
    permitted"."""
    from gptkit.errors import GptkitError
    from gptkit.inference.decoding import derive_sampler
    from gptkit.registry.registry import load_registry

    registry = load_registry()
    top_k = registry.get("sampler", "top_k")(kind="top_k")
    with pytest.raises(GptkitError) as info:
        derive_sampler(registry, top_k, {"p": 2})
    message = str(info.value)
    assert "sampler.p: not a field of sampler kind 'top_k'" in message
    assert "its fields: k," in message and "p is a field of min_p, top_p" in message
    assert "Extra inputs" not in message
