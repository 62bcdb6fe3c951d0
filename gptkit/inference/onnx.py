"""Run an exported bundle with onnxruntime. Needs numpy, onnxruntime and the tokenizer
library — never torch (the tests check that ``torch`` stays out of ``sys.modules``).

>>> bundle = gptkit.load("bundles/shakespeare")                 # doctest: +SKIP
>>> bundle.generate("ROMEO:", max_new_tokens=100, seed=1)        # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from gptkit.errors import GptkitError, RunError
from gptkit.inference.cache import StaticCache, drop_slots, join_rows, keep_rows
from gptkit.inference.decoding import positions_from_mask
from gptkit.store.bundle import MANIFEST, MODEL_FILE, verify_bundle

__all__ = ["OnnxBackend", "OnnxModel", "open_bundle"]


def _session_options(threads: int | None = None, spin: bool = True) -> Any:
    """``spin``: onnxruntime's worker threads spin-wait between ops (fastest when decoding is
    all the process does; a server turns it off, so that the spinning does not take the CPU
    from its HTTP side — measured in ``gptkit bench --serve``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One inter-op thread and all cores inside each op: decoding is a chain of small ops.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = (
        threads or int(os.environ.get("GPTKIT_ORT_THREADS", 0)) or (os.cpu_count() or 1)
    )
    return opts


class OnnxModel:
    """An exported decoder graph. ``run`` follows the decoding loop's backend protocol; its
    cache is a ``StaticCache`` for a static-cache graph (see ``gptkit/export/onnx.py``), else a
    list of arrays that the graph concatenates."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), _session_options(threads, spin), providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.static = "cache_position" in self.inputs
        self.max_cache: int | None = None  # the most cache slots a decode can need, if known
        shape = self.session.get_inputs()[self.inputs.index(self.past_names[0])].shape
        self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        key_mask: np.ndarray,
        past: Any,
        all_logits: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """ids/positions (B, T), key_mask (B, P + T) -> last (or all) logits and the new cache."""
        if self.static:
            return self._run_static(ids, positions, key_mask, past, all_logits)
        return self._run_concat(ids, positions, key_mask, past, all_logits)

    def _failed(self, exc: Exception) -> RunError:
        """The graph failed as onnxruntime ran it: a damaged or edited bundle (an allocation of
        terabytes, a node that cannot run), or a batch larger than this machine's memory."""
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        return RunError(
            f"the bundle's graph {self.path} failed to run: {reason[:500]}",
            "A bundle changed after export (export the run again), or more memory than this "
            "machine has (a smaller batch).",
        )

    def _run_concat(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        key_mask: np.ndarray,
        past: Any,
        all_logits: bool,
    ) -> tuple[np.ndarray, Any]:
        B = ids.shape[0]
        if past is None:
            empty = np.zeros((B, self.n_kv_heads, 0, self.head_dim), dtype=np.float32)
            past = [empty] * len(self.past_names)
        feeds = {
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(key_mask, dtype=np.int64),
        }
        feeds.update(zip(self.past_names, past))
        try:
            logits, *present = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime's errors (RuntimeError, Fail, ...)
            raise self._failed(exc) from None
        return (logits if all_logits else logits[:, -1]), present

    def _run_static(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        key_mask: np.ndarray,
        past: StaticCache | None,
        all_logits: bool,
    ) -> tuple[np.ndarray, StaticCache]:
        """One step over the preallocated cache: the buffers are bound to the graph's inputs
        in place (IO binding, no copy), and only the new tokens' keys/values come back, to be
        written into the next slots. A prefill (nothing cached yet) binds no slots at all, so
        its attention spans the prompt only, not the empty capacity after it."""
        B, T = ids.shape
        if past is None:
            past = StaticCache.empty(
                len(self.past_names),
                B,
                self.n_kv_heads,
                self.head_dim,
                min(64, self.max_cache or 64),
            )
        L = past.length
        past.reserve(L + T, self.max_cache)
        S = past.capacity if L else 0
        mask = np.zeros((B, S + T), dtype=np.int64)
        mask[:, :L] = key_mask[:, :L]
        mask[:, S:] = key_mask[:, L:]
        binding = self._binding(past, B, T, S)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("cache_position", np.array(L, dtype=np.int64))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's errors (RuntimeError, Fail, ...)
            raise self._failed(exc) from None
        logits, *new = binding.copy_outputs_to_cpu()
        past.write(new)
        return (logits if all_logits else logits[:, -1]), past

    def _binding(self, past: StaticCache, B: int, T: int, S: int) -> Any:
        """The IO binding for a step of ``B`` rows, ``T`` new tokens over ``S`` slots, kept with
        the cache (one per batch, so one per thread) and made again only when the shapes
        change: the cache buffers stay bound (onnxruntime values over the same memory; a
        prefill, ``S`` 0, binds empty ones), and the outputs onnxruntime allocated at the first
        such step are reused at the next ones (binding everything anew each step took a fifth
        of a batch-1 step)."""
        from onnxruntime import OrtValue

        key = (B, T, S)
        if past.binding is not None and past.binding[0] == key:
            return past.binding[1]
        binding = self.session.io_binding()
        buffers = past.buffers if S else [b[:, :, :0].copy() for b in past.buffers]
        values = [OrtValue.ortvalue_from_numpy(b) for b in buffers]  # kept: they hold memory
        for name, value in zip(self.past_names, values):
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        past.binding = (key, binding, values)
        return binding


class OnnxBackend:
    """Runs an ``OnnxModel`` for the decoding loop."""

    def __init__(self, model: OnnxModel, max_seq_len: int) -> None:
        self.model, self.max_seq_len = model, max_seq_len
        model.max_cache = max_seq_len  # the decoding loop never caches more than the context

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        return self.model.run(ids, positions, key_mask, past)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """The logits (T, V) at every position of one prompt (no cache kept)."""
        row = np.array([ids], dtype=np.int64)
        mask = np.ones_like(row, dtype=bool)
        logits, _ = self.model.run(row, positions_from_mask(mask), mask, None, all_logits=True)
        first: np.ndarray = np.asarray(logits)[0]
        return first

    keep_rows = staticmethod(keep_rows)
    join_rows = staticmethod(join_rows)
    drop_slots = staticmethod(drop_slots)


def _runtime_registry(autoload: bool = False, modules: tuple[str, ...] = ()) -> Any:
    """The torch-free built-ins (tokenizers, samplers), ``modules``, and installed plugins only
    on request.

    Third-party plugins are loaded only when a bundle names a kind the built-ins lack: an
    installed attention plugin may import torch, and a deployment should not pay for that.
    """
    from gptkit.components import TORCH_FREE_BUILTINS
    from gptkit.registry.manager import plugin_manager
    from gptkit.registry.registry import Registry

    return Registry.from_manager(
        plugin_manager(modules, builtins=TORCH_FREE_BUILTINS, autoload=autoload)
    )


def _registry_for(
    kinds: dict[str, str],
    modules: tuple[str, ...] = (),
    recorded: dict[str, Any] | None = None,
    source: str = "bundle",
) -> Any:
    """A registry that knows every (slot -> kind) in ``kinds``, loading plugins if needed;
    a kind still missing is named with the package ``recorded`` (provenance) gives for it."""
    from gptkit.registry.manager import autoload_enabled, missing_kind_message

    registry = _runtime_registry(modules=modules)
    if all(kind in registry.components[slot] for slot, kind in kinds.items()):
        return registry
    registry = _runtime_registry(autoload=autoload_enabled(), modules=modules)
    problems = [
        m
        for slot, kind in kinds.items()
        if (m := missing_kind_message(registry, slot, kind, recorded))
    ]
    if problems:
        from gptkit.errors import PluginError

        raise PluginError(
            f"{source} " + "; and ".join(problems), "Run 'gptkit plugins' to see what is installed."
        )
    return registry


def _open_model(
    folder: Path, manifest: dict[str, Any], threads: int | None, spin: bool = True
) -> OnnxModel:
    """The bundle's graph, checked to be a decoder with the inputs the manifest names."""
    try:
        model = OnnxModel(folder / MODEL_FILE, threads, spin)
    except GptkitError:
        raise
    except Exception as exc:  # onnxruntime's own errors, or a graph without a cache
        raise RunError(
            f"bundle {folder}: {MODEL_FILE} is not a usable gptkit decoder graph "
            f"({type(exc).__name__}: {str(exc)[:300]})",
            "Export the bundle again.",
        ) from None
    if model.inputs != manifest["inputs"] or model.outputs != manifest["outputs"]:
        raise RunError(
            f"bundle {folder}: the inputs/outputs of {MODEL_FILE} differ from those in {MANIFEST}",
            "Export the bundle again.",
        )
    return model


def _check_vocab(folder: Path, manifest: dict[str, Any], tokenizer: Any, model: OnnxModel) -> None:
    """The tokenizer may never produce an id the model has no logit for."""
    vocab = manifest["vocab_size"]
    logits = model.session.get_outputs()[0].shape[-1]
    if isinstance(logits, int) and logits != vocab:
        raise RunError(
            f"bundle {folder}: {MODEL_FILE} has {logits} logits but {MANIFEST} says "
            f"vocab_size {vocab}",
            "Export the bundle again.",
        )
    special = manifest["special_tokens"]
    ids = (special["eot"], special["pad"], tokenizer.eot_id)
    if tokenizer.vocab_size > vocab or max(ids) >= vocab:
        raise RunError(
            f"bundle {folder}: the tokenizer has {tokenizer.vocab_size} tokens "
            f"(end-of-text id {special['eot']}) but the model only {vocab}; they "
            "do not belong together",
            "Export the bundle again.",
        )


def _check_logits(folder: Path, model: OnnxModel, token: int, vocab: int) -> None:
    """The graph answers one token with one finite logit per vocabulary entry: a graph that
    is not gptkit's (logits of another rank) or whose weights are NaN is named here, not
    met as an IndexError or as token 0 written for ever."""
    rank = len(model.session.get_outputs()[0].shape)
    if rank != 3:
        raise RunError(
            f"bundle {folder}: {MODEL_FILE}'s logits have {rank} dimensions; a gptkit "
            "decoder's are (batch, sequence, vocabulary)",
            "Export the bundle again.",
        )
    one = np.array([[token]], dtype=np.int64)
    logits, _ = model.run(one, np.zeros_like(one), np.ones((1, 1), dtype=bool), None)
    if logits.shape[-1] != vocab:
        raise RunError(
            f"bundle {folder}: {MODEL_FILE} gives {logits.shape[-1]} logits per token, but "
            f"{MANIFEST} says vocab_size {vocab}",
            "Export the bundle again.",
        )
    if not np.isfinite(logits).all():
        raise RunError(
            f"bundle {folder}: {MODEL_FILE} answers with logits that are not finite (NaN or "
            "inf): its weights are damaged",
            "Export the bundle again.",
        )


def open_bundle(path: str | Path, threads: int | None = None, spin: bool = True) -> dict[str, Any]:
    """The parts of an ``Inference`` over a verified export bundle (see ``gptkit.load``):
    onnxruntime model, tokenizer and default sampler. A bundle runs on onnxruntime's CPU
    provider."""
    from gptkit.components.tokenizers import load_tokenizer

    folder = Path(path)
    manifest = verify_bundle(folder)
    from gptkit.registry.manager import check_opened_plugins

    sampler_spec = manifest["spec"].get("sampler") or {"kind": "top_p"}
    modules = tuple(manifest["spec"].get("plugins") or ())
    check_opened_plugins(modules, f"bundle {folder}")  # never import what it merely names
    registry = _registry_for(
        {"tokenizer": manifest["spec"]["tokenizer"]["kind"], "sampler": sampler_spec["kind"]},
        modules,
        manifest.get("plugins") or {},
        f"bundle {folder}",
    )
    tokenizer = load_tokenizer(folder / "tokenizer", registry)
    if tokenizer.spec.kind != manifest["spec"]["tokenizer"]["kind"]:
        raise RunError(
            f"bundle {folder}: {MANIFEST} names tokenizer kind "
            f"'{manifest['spec']['tokenizer']['kind']}' but the tokenizer folder "
            f"holds '{tokenizer.spec.kind}'",
            "Export the bundle again.",
        )
    try:
        sampler = registry.get("sampler", sampler_spec["kind"]).model_validate(sampler_spec)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(["spec", "sampler", *map(str, err["loc"])])
        raise RunError(
            f"{folder / MANIFEST}: field '{field}': {err['msg']}",
            "The manifest is damaged; export the bundle again.",
        ) from None
    model = _open_model(folder, manifest, threads, spin)
    _check_vocab(folder, manifest, tokenizer, model)
    _check_logits(folder, model, int(manifest["special_tokens"]["eot"]), manifest["vocab_size"])
    return {
        "backend": OnnxBackend(model, int(manifest["max_seq_len"])),
        "tokenizer": tokenizer,
        "sampler": sampler,
        "registry": _BundleRegistry(registry, modules),
        "path": folder,
        "manifest": manifest,
        "plugins": modules,
    }


class _BundleRegistry:
    """The torch-free registry; installed plugins are loaded only for a kind it lacks."""

    def __init__(self, registry: Any, modules: tuple[str, ...]) -> None:
        self.registry, self.modules = registry, modules

    def __call__(self, kind: str) -> Any:
        if kind not in self.registry.components["sampler"]:
            self.registry = _registry_for({"sampler": kind}, self.modules)
        return self.registry
