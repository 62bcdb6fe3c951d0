"""An attention ported from the previous contract: ``build(model)`` without ``positional``."""

from typing import Literal

from gptkit import hookimpl
from gptkit.plugin import AttentionSpec

__version__ = "0.1"


class OldAttentionSpec(AttentionSpec):
    kind: Literal["old_attention"] = "old_attention"

    def build(self, model):  # the old signature: no keyword-only 'positional'
        raise AssertionError("never called: registration refuses it")


@hookimpl
def gptkit_register_attention(register):
    register(OldAttentionSpec)
