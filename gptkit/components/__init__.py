"""Built-in components. Each module is a plain plugin: it ends with its ``@hookimpl``."""

from gptkit.components.base import SLOTS

# The modules the plugin manager registers before any third-party plugin, from the slot table.
# The torch-free ones (tokenizers, samplers) are listed separately so the onnxruntime runtime
# can load only them.
TORCH_FREE_BUILTINS = tuple(s.builtins for s in SLOTS.values() if s.torch_free)
BUILTINS = tuple(s.builtins for s in SLOTS.values())
