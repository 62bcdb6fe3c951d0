"""The ONNX graph of a GPT with its KV cache.

One graph serves prefill and decode. With a static cache (every component supports it)::

    inputs   input_ids (B, T) int64, position_ids (B, T) int64,
             attention_mask (B, S + T) int64 (the S cache slots, then the new tokens;
                 1 = a real token, 0 = left padding or an unused slot),
             cache_position () int64 (slots in use: where the new tokens go),
             past_key_values.{i}.key / .value (B, H_kv, S, hd) float32: the preallocated cache
    outputs  logits (B, T, V) float32, present.{i}.key / .value (B, H_kv, T, hd): the new
             tokens' keys and values, which the runtime writes into its cache in place

so the graph never copies the cache. Otherwise (the declared fallback of a component that
cannot take a static cache) the cache is concatenated: ``past_key_values`` (B, H_kv, P, hd),
no ``cache_position``, and ``present`` (B, H_kv, P + T, hd) is the whole new cache.

Names follow onnxruntime-genai / Optimum. Batch, sequence and cache lengths are symbolic.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from gptkit.errors import GptkitError
from gptkit.model import GPT

# Opset 20 has a single Gelu op (with the tanh approximation GPT-2 uses); at 18 the tanh GELU
# is eight elementwise nodes per layer that onnxruntime does not fuse (a GPT-2-shaped decode
# step measured 6% slower: 3.60 against 3.37 ms). onnxruntime >= 1.17 runs opset 20.
OPSET = 20


class _OnnxDecoder(torch.nn.Module):
    """The GPT with flat, named inputs and outputs for export."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past_key_values):
        out = self.model(
            input_ids,
            positions=position_ids,
            past_key_values=past_key_values,
            key_mask=attention_mask.bool(),
        )
        return out.logits, out.past_key_values


class _StaticOnnxDecoder(torch.nn.Module):
    """The GPT over a static cache: the cache is read, and only the new keys/values leave."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, cache_position, past_key_values):
        from gptkit.components.attention import StaticKV

        past = [StaticKV(k, v, cache_position) for k, v in past_key_values]
        out = self.model(
            input_ids, positions=position_ids, past_key_values=past, key_mask=attention_mask.bool()
        )
        return out.logits, out.past_key_values


def io_names(n_layers: int, static: bool = False) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    first = ["input_ids", "position_ids", "attention_mask"] + (["cache_position"] if static else [])
    return [*first, *past], ["logits", *present]


def cache_shape(model: GPT) -> tuple[int, int]:
    """(H_kv, head_dim) of the first block's cache, read from a one-token forward."""
    with torch.no_grad():
        out = model(torch.zeros(1, 1, dtype=torch.long))
    k = out.past_key_values[0][0]
    return int(k.shape[1]), int(k.shape[3])


def export_onnx(model: GPT, path: Path, opset: int = OPSET, static: bool | None = None) -> None:
    """Write ``model`` as ONNX to ``path`` with symbolic batch / sequence / past dimensions;
    with a static cache when every component supports one (``static``: None = when it can)."""
    from torch.export import Dim

    model = model.eval()
    static = model.static_cache if static is None else static and model.static_cache
    n_layers = model.spec.n_layers
    h_kv, hd = cache_shape(model)
    # Example sizes of 2 and more: sizes 0 and 1 would be frozen into the graph.
    B, T, P = 2, 3, 4
    past = [(torch.randn(B, h_kv, P, hd), torch.randn(B, h_kv, P, hd)) for _ in range(n_layers)]
    args = (
        torch.randint(0, model.spec.vocab_size, (B, T)),
        torch.arange(P, P + T).expand(B, T).contiguous(),
        torch.ones(B, P + T, dtype=torch.long),
        past,
    )
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=1 << 16)
    past_len = Dim("past_sequence", min=0, max=1 << 16)
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "past_key_values": [({0: batch, 2: past_len}, {0: batch, 2: past_len})] * n_layers,
    }
    decoder: torch.nn.Module = _OnnxDecoder(model)
    if static:
        decoder = _StaticOnnxDecoder(model)
        args = (*args[:3], torch.tensor(P - 1), past)
        dynamic["cache_position"] = None
        dynamic["past_key_values"] = dynamic.pop("past_key_values")  # keep the argument order
    inputs, outputs = io_names(n_layers, static)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export traces an inference graph: parameters that require grad (a plugin's learned
    # score bias, say) would otherwise be traced through autograd. Restored afterwards.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        model.requires_grad_(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            import logging

            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                decoder,
                args,
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                verbose=False,
                optimize=True,
            )
        program.model.metadata_props.update(graph_facts(model, static))
        program.save(str(path))
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        if _os_error(exc) is not None:
            raise  # disk full, permissions: the bundle writer says so, not a component's fault
        raise GptkitError(
            export_failure(model.spec, exc),
            "Run the component's contract tests (gptkit.testing) for the cause.",
        ) from None
    finally:
        for p in trainable:
            p.requires_grad_(True)


# What the runtime takes from the manifest about the graph, also written into the graph
# itself (``metadata_props``, covered by the graph's hash): a manifest edited to say otherwise
# is refused when the bundle is opened (``gptkit.store.bundle.check_graph_facts``).
GRAPH_FACTS = ("max_seq_len", "vocab_size", "n_layers", "n_kv_heads", "head_dim", "cache")


def graph_facts(model: GPT, static: bool) -> dict[str, str]:
    """The graph's shape facts as ONNX metadata (``gptkit.max_seq_len``: "256", ...)."""
    h_kv, hd = cache_shape(model)
    spec = model.spec
    facts = {
        "max_seq_len": spec.max_seq_len,
        "vocab_size": spec.vocab_size,
        "n_layers": spec.n_layers,
        "n_kv_heads": h_kv,
        "head_dim": hd,
        "cache": "static" if static else "concat",
    }
    return {f"gptkit.{k}": str(facts[k]) for k in GRAPH_FACTS}


def graph_opset(path: Path) -> int:
    """The ONNX operator set a graph file was written for (its default domain's)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise GptkitError(f"{path}: the graph names no ONNX operator set", "Export it again.")
    return versions[0]


def export_failure(spec: Any, exc: BaseException) -> str:
    """One paragraph: which components the failed graph holds, and the cause."""
    parts = []
    for slot in ("attention", "positional"):
        component = getattr(spec, slot)
        parts.append(f"{slot} '{component.kind}' ({type(component).__module__})")
    cause = str(exc).strip().splitlines()
    cause_text = cause[0] if cause else ""
    return (
        f"ONNX export failed for the model with {' and '.join(parts)}: "
        f"{type(exc).__name__}: {cause_text[:500]}"
    )


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (exporters wrap them), if any."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
