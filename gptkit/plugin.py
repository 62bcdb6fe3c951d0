"""Everything a gptkit plugin author imports: ``from gptkit import plugin``.

This module is the contract. A plugin is a module (found through the entry-point group
``gptkit``, or named with ``--plugin``/``GPTKIT_PLUGINS``/a spec's ``plugins:``) with one or more
``@plugin.hookimpl`` functions, one per slot it fills::

    from typing import Literal
    from gptkit import plugin

    class WordSpec(plugin.TokenizerSpec):
        '''Whitespace-separated words.'''
        kind: Literal["word"] = "word"

        def build(self):
            return WordTokenizer(self)

    @plugin.hookimpl
    def gptkit_register_tokenizer(register):
        register(WordSpec)

The five slots (:data:`SLOTS`), with the base class whose docstring is the slot's contract:

==========  ====================  =========================================================
slot        base class            ``build`` returns
==========  ====================  =========================================================
attention   :class:`AttentionSpec`  ``build(model, *, positional)`` -> ``torch.nn.Module``
positional  :class:`PositionalSpec` ``build(model)`` -> :class:`PositionalEncoding`
tokenizer   :class:`TokenizerSpec`  ``build()`` -> :class:`Tokenizer` (unfitted)
sampler     :class:`SamplerSpec`    ``build()`` -> the spec itself (numpy only)
optimizer   :class:`OptimizerSpec`  ``build(model, *, lr)`` -> ``torch.optim.Optimizer``
==========  ====================  =========================================================

Rules every component follows:

- **The spec class is torch-free.** The module your entry point names is imported by every
  command, including ``gptkit generate BUNDLE`` and ``gptkit serve`` which run without torch.
  Import torch inside ``build`` (or from a submodule imported there). Tokenizer and sampler
  code must not need torch at all.
- **A component is a pydantic model**: ``kind: Literal["name"] = "name"`` names it; its typed
  fields are what a spec may set (unknown keys are errors). Give small ``examples=[...]`` to
  fields whose defaults are large: the contract tests build the component from them
  (:meth:`ComponentSpec.example`).
- ``check(model)`` returns ``(field, message)`` pairs for combinations with the model's other
  fields that cannot work (model components only).
- ``fingerprint()`` (tokenizers) returns what besides the fields changes the fitted result,
  e.g. the hash of a file the tokenizer reads.
- **Components own their initialisation.** The GPT initialises only the modules it builds
  itself (embeddings, MLPs, norms, head). Mark a projection that writes into the residual
  stream with :func:`mark_residual` to get GPT-2's depth-scaled initialisation.
- **A tokenizer refuses text it cannot encode** by raising :class:`EncodeError` (the user
  sees the message, exit 2; the server answers 400); any other exception from ``encode`` is
  reported as the tokenizer's failure to encode the prompt, naming it. It never drops text
  silently, gives no text its ``eot_id``, and fits the same way every time.
- **Samplers draw only from the ``rng`` passed in**; per-generation state lives in the object
  :meth:`SamplerSpec.new_state` returns, one per row, passed back at every step. Every one
  honours ``temperature`` and ``repetition_penalty`` (a replaced ``probs`` or ``adjust`` too).
- **Optimizers honour the schedule**: the trainer sets each group's ``lr`` every step as
  ``group["initial_lr"] * lr_at(step) / train.lr``; see :class:`OptimizerSpec`.
- Every component must pass ``gptkit.testing`` (:func:`contract_cases`), which gptkit's
  own suite and ``gptkit export`` rely on.

Provenance: each run (``<run>/plugins.json``) and bundle (key ``plugins`` of ``gptkit.json``)
records, for every non-built-in kind, ``{"<slot>.<kind>": {"distribution", "version", "module"}}``
(:func:`gptkit.registry.manager.provenance`), so that opening it without the plugin names
the package to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptkit.components.base import (
    SLOTS,
    AttentionSpec,
    ComponentSpec,
    OptimizerSpec,
    PositionalSpec,
    SamplerSpec,
    Slot,
    TokenizerSpec,
    inverse_cdf,
    mark_residual,
)
from gptkit.components.tokenizers import EOT, Tokenizer
from gptkit.errors import EncodeError
from gptkit.registry.hookspecs import Register, hookimpl

# Names that need torch, imported on first use so that ``from gptkit import plugin`` stays
# torch-free for tokenizer and sampler plugins.
_LAZY = {
    "KVCache": "gptkit.components.attention",
    "StaticKV": "gptkit.components.attention",
    "CausalSelfAttention": "gptkit.components.attention",
    "PositionalEncoding": "gptkit.components.positional",
    "contract_cases": "gptkit.testing",
    "run_contract": "gptkit.testing",
}

__all__ = [
    "SLOTS",
    "Slot",
    "hookimpl",
    "Register",
    "ComponentSpec",
    "AttentionSpec",
    "PositionalSpec",
    "TokenizerSpec",
    "SamplerSpec",
    "OptimizerSpec",
    "Tokenizer",
    "EncodeError",
    "EOT",
    "inverse_cdf",
    "mark_residual",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptkit.plugin' has no attribute {name!r}")
