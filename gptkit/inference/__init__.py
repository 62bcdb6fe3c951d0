"""Generation: ``load(path)`` opens a training run (torch) or an export bundle (onnxruntime)
as one ``Inference`` object, with the same options everywhere.

``base`` holds ``Inference``; ``decoding`` the shared decoding loop and continuous batching;
``cache`` the one static KV cache; ``torch`` and ``onnx`` the two backends. Importing this
package (or opening a bundle) never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.inference.base import Inference


def load(path: str | Path, **kwargs: Any) -> Inference:
    """``gptkit.load(path)``: a run directory (torch) or an export bundle (onnxruntime) as an
    ``Inference``. Keywords: ``checkpoint`` ("latest", "best" or a step) and ``device`` for
    runs, ``threads`` for bundles."""
    return Inference.load(path, **kwargs)


__all__ = ["Inference", "load"]
