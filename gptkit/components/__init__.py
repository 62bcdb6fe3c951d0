"""Built-in components. Each module is a plain plugin: it ends with its ``@hookimpl``."""

# The modules the plugin manager registers before any third-party plugin. The torch-free ones
# (tokenizers, samplers) are listed separately so the onnxruntime runtime can load only them.
TORCH_FREE_BUILTINS = ("gptkit.components.tokenizers", "gptkit.components.samplers")
BUILTINS = (
    "gptkit.components.attention",
    "gptkit.components.positional",
    "gptkit.components.optimizers",
    *TORCH_FREE_BUILTINS,
)
