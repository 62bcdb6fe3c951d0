"""Export a trained run to an ONNX bundle with a KV cache, parity-checked against torch.

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

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.errors import GptkitError, RunError
from gptkit.integrity import folder_files, removable_bundle
from gptkit.model import GPT

# Opset 20 has a single Gelu op (with the tanh approximation GPT-2 uses); at 18 the tanh GELU
# is eight elementwise nodes per layer that onnxruntime does not fuse (a GPT-2-shaped decode
# step measured 6% slower: 3.60 against 3.37 ms). onnxruntime >= 1.17 runs opset 20.
OPSET = 20
MANIFEST = "gptkit.json"
MODEL_FILE = "model.onnx"
# Parity is judged relative to the logits' own scale (their largest magnitude, at least 1):
# fp32 rounding grows with the size of the numbers, so a fixed absolute bound fails real models
# with peaked logits (GPT-2's are in the hundreds) while a broken export is off by far more.
PARITY_RTOL = 1e-4
# Dynamic int8 gives each activation one scale per tensor, from its range: an input whose peak
# is far above its typical size (squared ReLU's output, outlier features) keeps only a few of
# the 256 levels for its typical values. A matrix multiplication whose input peaks above this
# many times its RMS on validation windows stays fp32 (its uint8 step would be 8-16% of the
# RMS, for a one-sided or a two-sided range). On three trained speedrun runs (squared ReLU) the
# four MLP down-projections' inputs peak at 28-76x their RMS and every other input at 3-9x;
# keeping those four in fp32 lifted greedy agreement from 98.5-99.2% to 99.0-99.4%.
INT8_PEAK_OVER_RMS = 20.0
# Validation windows for the int8 measurements are at most this long (a long-context model's
# full window would hold (T, T) attention scores per head and (T, vocabulary) logits).
INT8_MAX_WINDOW = 1024


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


def bundle_manifest(
    folder: Path, spec: Any, model: GPT, tokenizer: Any, precision: str = "fp32"
) -> dict[str, Any]:
    """The manifest fields every bundle has (``Bundle.load`` checks them): the graph's inputs,
    outputs and cache layout, the tokenizer's special ids, the spec, and every file in
    ``folder`` (the graph and the saved tokenizer) with its hash. ``export_run`` adds the
    run, parity and quantization reports to it."""
    h_kv, hd = cache_shape(model)
    inputs, outputs = io_names(spec.model.n_layers, model.static_cache)
    return {
        "format": 1,
        "gptkit_version": __import__("gptkit").__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": spec.to_dict(),
        "inputs": inputs,
        "outputs": outputs,
        "vocab_size": spec.model.vocab_size,
        "special_tokens": {"eot": tokenizer.eot_id, "pad": tokenizer.pad_id},
        "max_seq_len": spec.model.max_seq_len,
        "n_layers": spec.model.n_layers,
        "n_kv_heads": h_kv,
        "head_dim": hd,
        "cache": "static" if model.static_cache else "concat",
        "opset": graph_opset(folder / MODEL_FILE),
        "precision": precision,
        # Everything in the folder is ours: list (and hash) every file of it.
        "files": {f: sha256_file(folder / f) for f in sorted(folder_files(folder))},
    }


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- parity


def parity_check(
    model: GPT,
    onnx_path: Path,
    decode_steps: int = 32,
    seed: int = 0,
    tolerance: float = PARITY_RTOL,
) -> dict[str, Any]:
    """Run torch and onnxruntime side by side: a prefill, then cached decode steps.

    Passes when every logit differs by at most ``tolerance`` times the logits' scale (the
    largest |logit| torch produced, at least 1) and greedy tokens agree at every step.
    """
    from gptkit.runtime import OnnxModel

    ort_model = OnnxModel(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    V, T = model.spec.vocab_size, min(16, model.spec.max_seq_len - decode_steps - 1)
    if T < 1:
        T = max(1, model.spec.max_seq_len // 2)
        decode_steps = max(1, model.spec.max_seq_len - T - 1)
    ids = torch.randint(0, V, (2, T), generator=gen)
    mask = np.ones((2, T), dtype=bool)
    pos = np.arange(T)[None].repeat(2, 0)
    with torch.no_grad():
        ref = model(ids, positions=torch.from_numpy(pos))
    logits, past = ort_model.run(ids.numpy(), pos, mask, None, all_logits=True)
    prefill_diff = float(np.abs(logits - ref.logits.numpy()).max())
    scale = float(ref.logits.abs().max())
    decode_diff, greedy_same = 0.0, True
    torch_past = ref.past_key_values
    tok_t = ref.logits[:, -1].argmax(-1, keepdim=True)
    tok_o = torch.from_numpy(logits[:, -1].argmax(-1)[:, None])
    for step in range(decode_steps):
        greedy_same &= bool(torch.equal(tok_t, tok_o))
        p = np.full((2, 1), T + step, dtype=np.int64)
        mask = np.ones((2, T + step + 1), dtype=bool)
        with torch.no_grad():
            out = model(tok_t, positions=torch.from_numpy(p), past_key_values=torch_past)
        logits, past = ort_model.run(tok_t.numpy(), p, mask, past, all_logits=True)
        decode_diff = max(decode_diff, float(np.abs(logits - out.logits.numpy()).max()))
        scale = max(scale, float(out.logits.abs().max()))
        torch_past = out.past_key_values
        tok_t = out.logits[:, -1].argmax(-1, keepdim=True)
        tok_o = torch.from_numpy(logits[:, -1].argmax(-1)[:, None])
    greedy_same &= bool(torch.equal(tok_t, tok_o))
    scale = max(scale, 1.0)
    relative = max(prefill_diff, decode_diff) / scale
    ok = relative <= tolerance and greedy_same
    return {
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "logit_scale": scale,
        "max_rel_diff": relative,
        "decode_steps": decode_steps,
        "greedy_tokens_identical": greedy_same,
        "tolerance": tolerance,
        "passed": ok,
    }


# --------------------------------------------------------------------------- int8


def quantize_int8(src: Path, dst: Path, keep: Sequence[str] = ()) -> None:
    """Dynamic int8 quantization of the matrix multiplications (onnxruntime's tool); the
    MatMul nodes named in ``keep`` stay fp32."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the tool logs a generic pre-processing hint at WARNING
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=list(keep),
        )
    finally:
        root.setLevel(level)


def _windows(val_ids: np.ndarray, window: int, max_tokens: int) -> list[np.ndarray]:
    """Consecutive validation windows of ``window + 1`` tokens (``window`` at most
    ``INT8_MAX_WINDOW``), about ``max_tokens`` in all (at least one)."""
    if len(val_ids) < 2:
        raise GptkitError(
            f"the validation split has {len(val_ids)} token(s); measuring int8 needs at least 2",
            "Use a larger corpus or a larger data.val_fraction.",
        )
    window = max(1, min(window, INT8_MAX_WINDOW, len(val_ids) - 1))
    n = min(max(1, max_tokens // window), max(1, (len(val_ids) - 1) // window))
    return [np.asarray(val_ids[i * window : i * window + window + 1], np.int64) for i in range(n)]


def _prefill_feeds(session: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for a prefill of ``ids`` (1, T) over an empty cache, static or concatenating."""
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "position_ids": np.arange(ids.shape[1])[None],
        "attention_mask": np.ones_like(ids),
    }
    for i in session.get_inputs():
        if i.name == "cache_position":
            feeds[i.name] = np.array(0, np.int64)
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def _module_of(node: Any) -> str:
    """The torch module a node came from (``blocks.0.mlp.out_proj``), else the node's name."""
    for prop in node.metadata_props:
        if prop.key == "namespace" and "/" in prop.value:
            owner = prop.value.split("/")[-2].split(":")[0].strip()
            return owner.removeprefix("model.") or node.name
    return node.name


def activation_peaks(
    fp32: Path, val_ids: np.ndarray, window: int, max_tokens: int = 2048
) -> dict[str, dict[str, Any]]:
    """For every MatMul (or Gemm) with a weight matrix, by node name: the largest |input| over
    the input's RMS on validation windows (a prefill each), and the module it belongs to."""
    import onnx
    import onnxruntime as ort

    graph_model = onnx.load(str(fp32))
    graph = graph_model.graph
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    inputs = sorted({n.input[0] for n in matmuls})
    known = {o.name for o in graph.output}
    graph.output.extend(
        onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
        for x in inputs
        if x not in known
    )
    session = ort.InferenceSession(
        graph_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    peak = dict.fromkeys(inputs, 0.0)
    squares = dict.fromkeys(inputs, 0.0)
    count = dict.fromkeys(inputs, 0)
    for chunk in _windows(val_ids, window, max_tokens):
        values = session.run(inputs, _prefill_feeds(session, chunk[None, :-1]))
        for name, x in zip(inputs, values):
            peak[name] = max(peak[name], float(np.abs(x).max()))
            squares[name] += float(np.square(x, dtype=np.float64).sum())
            count[name] += x.size
    rms = {x: (squares[x] / max(count[x], 1)) ** 0.5 for x in inputs}
    peaks: dict[str, dict[str, Any]] = {}
    labels: set[str] = set()
    for n in matmuls:
        label = _module_of(n)
        if label in labels:  # one module, several products: name each by its node too
            label = f"{label} ({n.name})"
        labels.add(label)
        x = n.input[0]
        peaks[n.name] = {"module": label, "peak_over_rms": peak[x] / rms[x] if rms[x] else 0.0}
    return peaks


def quality_report(
    fp32: Path, int8: Path, val_ids: np.ndarray, window: int, max_tokens: int = 8192
) -> dict[str, Any]:
    """Greedy top-1 agreement and validation perplexity, int8 against fp32, over about
    ``max_tokens`` validation tokens."""
    from gptkit.runtime import OnnxModel

    a, b = OnnxModel(fp32), OnnxModel(int8)
    agree = total = 0
    nll = {"fp32": 0.0, "int8": 0.0}
    for chunk in _windows(val_ids, window, max_tokens):
        x, y = chunk[None, :-1], chunk[1:]
        pos = np.arange(x.shape[1])[None]
        mask = np.ones_like(x, dtype=bool)
        la, _ = a.run(x, pos, mask, None, all_logits=True)
        lb, _ = b.run(x, pos, mask, None, all_logits=True)
        agree += int((la[0].argmax(-1) == lb[0].argmax(-1)).sum())
        total += len(y)
        for name, lg in (("fp32", la[0]), ("int8", lb[0])):
            lg = lg - lg.max(-1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            nll[name] -= float(logp[np.arange(len(y)), y].sum())
    ppl = {k: float(np.exp(v / total)) for k, v in nll.items()}
    return {
        "top1_agreement": agree / total,
        "tokens": total,
        "val_ppl_fp32": ppl["fp32"],
        "val_ppl_int8": ppl["int8"],
        "val_ppl_change": ppl["int8"] - ppl["fp32"],
    }


# --------------------------------------------------------------------------- bundle


def export_run(
    run: str | Path,
    out: str | Path,
    quantize: str | None = None,
    checkpoint: str = "latest",
    register: str | None = None,
    log=print,
    tolerance: float = PARITY_RTOL,
) -> dict[str, Any]:
    """Export a run to a bundle folder; returns the manifest. Refuses to finish on a parity
    miss (``tolerance``: the largest logit difference accepted, relative to the logits' scale)."""
    from gptkit.training.rundir import load_run

    out = Path(out)
    _check_replaceable(out)
    loaded = load_run(run, checkpoint=checkpoint)
    model, spec = loaded.model, loaded.spec
    tmp = _make_staging(out)
    try:
        t0 = time.time()
        log(f"exporting {loaded.checkpoint} to ONNX (opset {OPSET}) ...")
        export_onnx(model, tmp / MODEL_FILE)
        log(f"  exported in {time.time() - t0:.1f}s; checking parity with torch ...")
        parity = parity_check(model, tmp / MODEL_FILE, tolerance=tolerance)
        worst = max(parity["prefill_max_abs_diff"], parity["decode_max_abs_diff"])
        log(
            f"  parity: max |diff| {worst:.2e} on logits of scale {parity['logit_scale']:.3g} = "
            f"{parity['max_rel_diff']:.2e} relative (tolerance {tolerance:.0e}) over a prefill "
            f"and {parity['decode_steps']} decode steps; greedy identical: "
            f"{parity['greedy_tokens_identical']}"
        )
        if not parity["passed"]:
            why = (
                "greedy tokens differ"
                if not parity["greedy_tokens_identical"]
                else f"relative difference {parity['max_rel_diff']:.2e} > tolerance {tolerance:.0e}"
            )
            raise GptkitError(
                f"ONNX parity check failed ({why}): {json.dumps(parity)}; the bundle was not "
                "written",
                "If the difference is acceptable to you, pass a larger --tolerance; otherwise "
                "this is a bug in an attention/positional component's export path: run gptkit's "
                "contract tests for it.",
            )
        quant = _quantize_bundle(tmp, spec, log) if quantize == "int8" else None
        loaded.tokenizer.save(tmp / "tokenizer")
        manifest = {
            **bundle_manifest(tmp, spec, model, loaded.tokenizer, quantize or "fp32"),
            "source_run": str(loaded.run_dir),
            "checkpoint": loaded.checkpoint.name,
            "parity": parity,
            "quantization": quant,
            "plugins": _plugin_provenance(spec),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_in(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = _os_error(exc)
        if os_error is not None and not isinstance(exc, GptkitError):
            raise GptkitError(
                f"could not write the bundle {out}: {os_error.strerror or os_error}; "
                "nothing was written",
                "Free some space or choose another --out.",
            ) from None
        raise
    log(f"bundle written: {out}")
    _log_to_mlflow(loaded.run_dir, out, manifest, register, log)
    return manifest


def _quantize_bundle(tmp: Path, spec: Any, log) -> dict[str, Any]:
    """Replace ``tmp``'s graph by its int8 version (matrix multiplications whose input has
    outliers stay fp32); returns the quantization report for the manifest."""
    from gptkit.data import prepare_data

    data = prepare_data(spec.data, spec.tokenizer)
    fp32, int8 = tmp / MODEL_FILE, tmp / "model.int8.onnx"
    window = spec.model.max_seq_len
    peaks = activation_peaks(fp32, data.val, window)
    keep = [n for n, p in peaks.items() if p["peak_over_rms"] > INT8_PEAK_OVER_RMS]
    kept = [peaks[n]["module"] for n in keep]
    why = f" (fp32: {', '.join(kept)}; input peak over {INT8_PEAK_OVER_RMS:g}x its RMS)"
    log(f"  quantizing matrix multiplications to int8{why if kept else ''} ...")
    quantize_int8(fp32, int8, keep)
    quant = quality_report(fp32, int8, data.val, window)
    quant["fp32_matmuls"] = kept
    quant["input_peak_over_rms"] = {
        p["module"]: round(p["peak_over_rms"], 2) for p in peaks.values()
    }
    quant["size_fp32"], quant["size_int8"] = fp32.stat().st_size, int8.stat().st_size
    os.replace(int8, fp32)
    log(
        f"  int8: top-1 agreement {quant['top1_agreement']:.2%}, val perplexity "
        f"{quant['val_ppl_fp32']:.3f} -> {quant['val_ppl_int8']:.3f}, size "
        f"{quant['size_fp32'] / 1e6:.1f} MB -> {quant['size_int8'] / 1e6:.1f} MB"
    )
    return quant


def _plugin_provenance(spec: Any) -> dict[str, dict[str, str]]:
    """Which package provides each non-built-in kind (the manifest's ``plugins``)."""
    from gptkit.plugins import provenance
    from gptkit.registry import load_registry

    return provenance(load_registry(tuple(spec.plugins)), spec)


def _check_replaceable(out: Path) -> None:
    """Refuse an --out that gptkit cannot prove it made (data of the user's would be lost)."""
    reason = removable_bundle(out)
    if reason is not None:
        raise GptkitError(
            f"{reason}; refusing to overwrite it",
            "Choose an empty or new --out folder (gptkit replaces only a bundle "
            "whose manifest lists every file in it).",
        )


def _make_staging(out: Path) -> Path:
    """A fresh hidden folder beside ``out``, on the same file system (for an atomic rename)."""
    import tempfile

    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GptkitError(
            f"cannot write the bundle {out}: {blocker} is a file, not a folder",
            "Choose another --out.",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise GptkitError(
            f"cannot write the bundle {out}: {exc.strerror or exc}",
            "Choose a folder you can write to for --out.",
        ) from None


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is replaced only after a re-check."""
    _check_replaceable(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (exporters wrap them), if any."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _log_to_mlflow(
    run_dir: Path, bundle: Path, manifest: dict[str, Any], register: str | None, log
) -> None:
    """Attach the bundle and an ONNX-flavour model to the run's MLflow run, under a name of
    its own (``onnx-fp32``, ``onnx-int8``, then ``-2``, ``-3`` ...), without moving the
    training run's times or status. Never fatal unless ``--register`` was asked for."""
    from gptkit.training.rundir import RunDir
    from gptkit.training.tracking import quick_timeouts, read_mlflow_link

    info = read_mlflow_link(RunDir(run_dir))
    if not info:
        if register:
            raise RunError(
                f"--register needs the run's MLflow record "
                f"({RunDir(run_dir).mlflow_file} is missing or damaged)"
            )
        return
    try:
        quick_timeouts()
        name = _attach_bundle(info, bundle, manifest, register)
        log(
            f"logged to MLflow run {info['run_id']} as '{name}'"
            + (f", registered as '{register}'" if register else "")
        )
    except Exception as exc:
        if register:
            raise GptkitError(f"could not register the model in MLflow: {exc}") from None
        log(f"gptkit: warning: bundle not logged to MLflow ({type(exc).__name__}: {exc})")


def _attach_bundle(
    info: dict[str, Any], bundle: Path, manifest: dict[str, Any], register: str | None
) -> str:
    import mlflow
    import onnx

    client = mlflow.tracking.MlflowClient(info["uri"])
    run_id = info["run_id"]
    before = client.get_run(run_id).info
    taken = {a.path for a in client.list_artifacts(run_id, "bundles")}
    base = f"onnx-{manifest['precision']}"
    name, n = base, 1
    while f"bundles/{name}" in taken:
        n += 1
        name = f"{base}-{n}"
    parity = manifest["parity"]
    metrics = {
        f"{name}.prefill_max_abs_diff": parity["prefill_max_abs_diff"],
        f"{name}.decode_max_abs_diff": parity["decode_max_abs_diff"],
    }
    if manifest.get("quantization"):
        q = manifest["quantization"]
        metrics.update(
            {
                f"{name}.top1_agreement": q["top1_agreement"],
                f"{name}.val_ppl_change": q["val_ppl_change"],
            }
        )
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    client.log_artifacts(run_id, str(bundle), f"bundles/{name}")
    try:
        with _tracking_uri(info["uri"]), mlflow.start_run(run_id=run_id):
            mlflow.onnx.log_model(
                onnx.load(str(bundle / MODEL_FILE)),
                name=name,
                signature=_signature(manifest),
                registered_model_name=register,
            )
    finally:  # start_run reopened the run: put its status and end time back as they were
        if before.end_time:
            client.set_terminated(run_id, status=before.status, end_time=before.end_time)
    return name


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API at ``uri`` for a moment: ``mlflow.set_tracking_uri`` also sets
    $MLFLOW_TRACKING_URI, which would otherwise stay changed for the caller (a notebook) and
    every process it starts."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if env is not None else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
        else:
            mlflow.set_tracking_uri(None)  # back to "not set" (its default)
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def _signature(manifest: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    hd, hkv = manifest["head_dim"], manifest["n_kv_heads"]
    past = [n for n in manifest["inputs"] if n.startswith("past_key_values.")]
    inputs = [TensorSpec(np.dtype(np.int64), (-1, -1), n) for n in manifest["inputs"][:3]]
    if "cache_position" in manifest["inputs"]:  # the static cache's write position, a scalar
        inputs.append(TensorSpec(np.dtype(np.int64), (), "cache_position"))
    inputs += [TensorSpec(np.dtype(np.float32), (-1, hkv, -1, hd), n) for n in past]
    outputs = [TensorSpec(np.dtype(np.float32), (-1, -1, manifest["vocab_size"]), "logits")]
    outputs += [
        TensorSpec(np.dtype(np.float32), (-1, hkv, -1, hd), n) for n in manifest["outputs"][1:]
    ]
    return ModelSignature(Schema(inputs), Schema(outputs))
