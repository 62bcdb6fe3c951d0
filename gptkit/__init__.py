"""gptkit: build, train, compare and ship small GPT-style language models.

``import gptkit`` is cheap and torch-free; the torch parts load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptkit.hookspecs import hookimpl

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562).
_LAZY = {
    "ExperimentSpec": "gptkit.spec",
    "ModelSpec": "gptkit.spec",
    "load_spec": "gptkit.spec",
    "validate_spec": "gptkit.spec",
    "spec_class": "gptkit.spec",
    "load_registry": "gptkit.registry",
    "plugin_manager": "gptkit.plugins",
    "GPT": "gptkit.model",
    "build_model": "gptkit.model",
    "GptkitError": "gptkit.errors",
    "load": "gptkit.api",
    "Inference": "gptkit.api",
    "GenerationOptions": "gptkit.decoding",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptkit' has no attribute {name!r}")
