from typing import Literal

from pydantic import Field

from gptkit import hookimpl
from gptkit.components.base import SamplerSpec


class BadDefaultSpec(SamplerSpec):
    kind: Literal["bad_default"] = "bad_default"
    p: float = Field(5.0, gt=0, le=1)  # the default breaks its own bound


@hookimpl
def gptkit_register_sampler(register):
    register(BadDefaultSpec)
