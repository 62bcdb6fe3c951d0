"""A sampler that keeps state outside new_state(): a step counter shared by every generation
sharpens the distribution as it grows (as a Mirostat-like target kept on the module would)."""

from typing import Literal

import numpy as np

from gptkit import hookimpl
from gptkit.components.base import inverse_cdf
from gptkit.plugin import SamplerSpec

__version__ = "0.1"

_STEPS = [0]


class LeakySpec(SamplerSpec):
    kind: Literal["leaky"] = "leaky"

    def sample(self, logits, rng, previous=None, states=None):
        _STEPS[0] += 1
        sharpened = np.asarray(logits, dtype=np.float64) * (1 + 0.05 * _STEPS[0])
        return inverse_cdf(self.probs(sharpened, previous, states), rng)


@hookimpl
def gptkit_register_sampler(register):
    register(LeakySpec)
