"""The hooks a gptkit plugin can implement: one per component slot.

Every hook receives a ``register`` callback; call it once per component class you provide::

    from gptkit import plugin

    class QKNormAttentionSpec(plugin.AttentionSpec):
        kind: Literal["qk_norm"] = "qk_norm"
        ...

    @plugin.hookimpl
    def gptkit_register_attention(register):
        register(QKNormAttentionSpec)

A component class is a pydantic model (a subclass of the slot's base spec, see
``gptkit.plugin``, which documents each slot's contract) whose ``kind`` field is a
``Literal`` naming it. Its typed fields are what a spec file may set, and its ``build(...)``
makes the object the slot needs. Built-in
components register through these same hooks.

Third-party packages are found through the entry-point group ``gptkit``; a module named in a
spec's ``plugins:`` list or in the ``GPTKIT_PLUGINS`` variable (comma-separated) is loaded too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "gptkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type[Any]], None]


@hookspec
def gptkit_register_attention(register: Register) -> None:
    """Register attention variants: subclasses of ``AttentionSpec``.

    ``build(model, *, positional)`` returns a module that takes new tokens plus the cached
    keys/values of earlier ones and returns the output and the extended cache (the full
    contract is ``AttentionSpec``'s docstring). It must export to ONNX.
    """


@hookspec
def gptkit_register_positional(register: Register) -> None:
    """Register positional schemes: subclasses of ``PositionalSpec``.

    ``build(model)`` returns a ``PositionalEncoding``
    module, which may add an embedding to the input, rotate queries and keys, and/or add a bias
    to the attention scores. It is handed to the attention module of every block.
    """


@hookspec
def gptkit_register_tokenizer(register: Register) -> None:
    """Register tokenizers: subclasses of ``TokenizerSpec``.

    ``build()`` returns an unfitted ``Tokenizer`` (fit, encode, decode, state, load_state).
    The module that registers it must not import torch: exported bundles load it without.
    """


@hookspec
def gptkit_register_sampler(register: Register) -> None:
    """Register samplers: subclasses of ``SamplerSpec``.

    A sampler works on a numpy array of logits, so the torch generator and the onnxruntime
    runtime share it. It must not import torch. Per-generation state: ``new_state()``.
    """


@hookspec
def gptkit_register_optimizer(register: Register) -> None:
    """Register optimizers: subclasses of ``OptimizerSpec``.

    ``build(model, *, lr)`` returns a ``torch.optim.Optimizer`` over the model's parameters;
    the trainer scales each group's own ``lr`` by the schedule (see ``OptimizerSpec``).
    """
