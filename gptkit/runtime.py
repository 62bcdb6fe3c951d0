"""Run an exported bundle with onnxruntime. Needs numpy, onnxruntime and the tokenizer
library — never torch (the tests check that ``torch`` stays out of ``sys.modules``).

>>> bundle = Bundle.load("bundles/shakespeare")                 # doctest: +SKIP
>>> bundle.generate("ROMEO:", max_new_tokens=100, seed=1)        # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from gptkit.decoding import Completion, decode_loop, derive_sampler
from gptkit.errors import GptkitError, RunError
from gptkit.integrity import MANIFEST, MODEL_FILE, verify_bundle

__all__ = ["Bundle", "OnnxModel", "verify_bundle", "MANIFEST", "MODEL_FILE"]


def _session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One inter-op thread and all cores inside each op: decoding is a chain of small ops.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads or int(os.environ.get("GPTKIT_ORT_THREADS", 0)) or (
        os.cpu_count() or 1)
    return opts


class OnnxModel:
    """An exported decoder graph. ``run`` follows the decoding loop's backend protocol."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), _session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        shape = self.session.get_inputs()[self.inputs.index(self.past_names[0])].shape
        self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def run(self, ids, positions, key_mask, past, all_logits: bool = False):
        """ids/positions (B, T), key_mask (B, P + T) -> last (or all) logits and the new cache."""
        B = ids.shape[0]
        if past is None:
            empty = np.zeros((B, self.n_kv_heads, 0, self.head_dim), dtype=np.float32)
            past = [empty] * len(self.past_names)
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(key_mask, dtype=np.int64)}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.session.run(None, feeds)
        return (logits if all_logits else logits[:, -1]), present


class _Backend:
    def __init__(self, model: OnnxModel, max_seq_len: int) -> None:
        self.model, self.max_seq_len = model, max_seq_len

    def __call__(self, ids, positions, key_mask, past):
        return self.model.run(ids, positions, key_mask, past)


def _runtime_registry(autoload: bool = False, modules: tuple[str, ...] = ()):
    """The torch-free built-ins (tokenizers, samplers), ``modules``, and installed plugins only
    on request.

    Third-party plugins are loaded only when a bundle names a kind the built-ins lack: an
    installed attention plugin may import torch, and a deployment should not pay for that.
    """
    from gptkit.components import TORCH_FREE_BUILTINS
    from gptkit.plugins import plugin_manager
    from gptkit.registry import Registry

    return Registry.from_manager(plugin_manager(modules, builtins=TORCH_FREE_BUILTINS,
                                                autoload=autoload))


def _registry_for(kinds: dict[str, str], modules: tuple[str, ...] = (),
                  recorded: dict[str, Any] | None = None, source: str = "bundle"):
    """A registry that knows every (slot -> kind) in ``kinds``, loading plugins if needed;
    a kind still missing is named with the package ``recorded`` (provenance) gives for it."""
    from gptkit.plugins import autoload_enabled, missing_kind_message

    registry = _runtime_registry(modules=modules)
    if all(kind in registry.components[slot] for slot, kind in kinds.items()):
        return registry
    registry = _runtime_registry(autoload=autoload_enabled(), modules=modules)
    problems = [m for slot, kind in kinds.items()
                if (m := missing_kind_message(registry, slot, kind, recorded))]
    if problems:
        from gptkit.errors import PluginError

        raise PluginError(f"{source} " + "; and ".join(problems),
                          "Run 'gptkit plugins' to see what is installed.")
    return registry


def _open_model(folder: Path, manifest: dict[str, Any], threads: int | None) -> OnnxModel:
    """The bundle's graph, checked to be a decoder with the inputs the manifest names."""
    try:
        model = OnnxModel(folder / MODEL_FILE, threads)
    except GptkitError:
        raise
    except Exception as exc:  # onnxruntime's own errors, or a graph without a cache
        raise RunError(f"bundle {folder}: {MODEL_FILE} is not a usable gptkit decoder graph "
                       f"({type(exc).__name__}: {str(exc)[:300]})",
                       "Export the bundle again.") from None
    if model.inputs != manifest["inputs"] or model.outputs != manifest["outputs"]:
        raise RunError(f"bundle {folder}: the inputs/outputs of {MODEL_FILE} differ from those "
                       f"in {MANIFEST}", "Export the bundle again.")
    return model


def _check_vocab(folder: Path, manifest: dict[str, Any], tokenizer: Any,
                 model: OnnxModel) -> None:
    """The tokenizer may never produce an id the model has no logit for."""
    vocab = manifest["vocab_size"]
    logits = model.session.get_outputs()[0].shape[-1]
    if isinstance(logits, int) and logits != vocab:
        raise RunError(f"bundle {folder}: {MODEL_FILE} has {logits} logits but {MANIFEST} says "
                       f"vocab_size {vocab}", "Export the bundle again.")
    special = manifest["special_tokens"]
    ids = (special["eot"], special["pad"], tokenizer.eot_id)
    if tokenizer.vocab_size > vocab or max(ids) >= vocab:
        raise RunError(f"bundle {folder}: the tokenizer has {tokenizer.vocab_size} tokens "
                       f"(end-of-text id {special['eot']}) but the model only {vocab}; they "
                       "do not belong together", "Export the bundle again.")


class Bundle:
    """A verified export bundle: onnxruntime model, tokenizer and default sampler."""

    def __init__(self, folder: Path, manifest: dict[str, Any], model: OnnxModel, tokenizer: Any,
                 sampler: Any, registry: Any) -> None:
        self.folder, self.manifest = folder, manifest
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.registry = registry
        self.max_seq_len = int(manifest["max_seq_len"])
        self.backend = _Backend(model, self.max_seq_len)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> Bundle:
        from gptkit.components.tokenizers import load_tokenizer

        folder = Path(folder)
        manifest = verify_bundle(folder)
        from gptkit.plugins import check_opened_plugins

        sampler_spec = manifest["spec"].get("sampler") or {"kind": "top_p"}
        modules = tuple(manifest["spec"].get("plugins") or ())
        check_opened_plugins(modules, f"bundle {folder}")  # never import what it merely names
        registry = _registry_for({"tokenizer": manifest["spec"]["tokenizer"]["kind"],
                                  "sampler": sampler_spec["kind"]}, modules,
                                 manifest.get("plugins") or {}, f"bundle {folder}")
        tokenizer = load_tokenizer(folder / "tokenizer", registry)
        if tokenizer.spec.kind != manifest["spec"]["tokenizer"]["kind"]:
            raise RunError(f"bundle {folder}: {MANIFEST} names tokenizer kind "
                           f"'{manifest['spec']['tokenizer']['kind']}' but the tokenizer folder "
                           f"holds '{tokenizer.spec.kind}'", "Export the bundle again.")
        try:
            sampler = registry.get("sampler", sampler_spec["kind"]).model_validate(sampler_spec)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(["spec", "sampler", *map(str, err["loc"])])
            raise RunError(f"{folder / MANIFEST}: field '{field}': {err['msg']}",
                           "The manifest is damaged; export the bundle again.") from None
        model = _open_model(folder, manifest, threads)
        _check_vocab(folder, manifest, tokenizer, model)
        return cls(folder, manifest, model, tokenizer, sampler, registry)

    def sampler_with(self, **changes: Any):
        """The bundle's sampler with some fields changed (``kind`` too)."""
        kind = changes.get("kind", self.sampler.kind)
        if kind not in self.registry.components["sampler"]:
            self.registry = _registry_for({"sampler": kind},
                                          tuple(self.manifest["spec"].get("plugins") or ()))
        return derive_sampler(self.registry, self.sampler, changes)

    def complete(self, prompts: Sequence[str], *, sampler: Any = None,
                 max_new_tokens: int | None = None, seed: int | None = None,
                 use_cache: bool = True,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        return decode_loop(self.backend, self.tokenizer, list(prompts), sampler or self.sampler,
                           max_new_tokens=max_new_tokens, seed=seed, use_cache=use_cache,
                           on_text=on_text)

    def generate(self, prompt: str, max_new_tokens: int = 200, seed: int | None = None,
                 **sampler_changes: Any) -> str:
        sampler = self.sampler_with(**sampler_changes) if sampler_changes else self.sampler
        return self.complete([prompt], sampler=sampler, max_new_tokens=max_new_tokens,
                             seed=seed)[0].text
