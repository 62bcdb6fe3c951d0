"""gptkit: build, train, compare and ship small GPT-style language models.

``import gptkit`` is cheap and torch-free; every name below loads its module when first used.
``gptkit.load(path)`` opens a run (torch) or an export bundle (onnxruntime); plugin authors
import ``gptkit.plugin``. docs/architecture.md maps the subpackages.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> module that defines it; imported on first access (PEP 562).
_LAZY = {
    "hookimpl": "gptkit.registry.hookspecs",
    "ExperimentSpec": "gptkit.spec.models",
    "ModelSpec": "gptkit.spec.models",
    "spec_class": "gptkit.spec.models",
    "load_spec": "gptkit.spec.files",
    "validate_spec": "gptkit.spec.validate",
    "load_registry": "gptkit.registry.registry",
    "plugin_manager": "gptkit.registry.manager",
    "GPT": "gptkit.model",
    "build_model": "gptkit.model",
    "GptkitError": "gptkit.errors",
    "load": "gptkit.inference",
    "Inference": "gptkit.inference.base",
    "GenerationOptions": "gptkit.inference.decoding",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptkit' has no attribute {name!r}")
