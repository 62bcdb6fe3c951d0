"""``export_run``: a trained run to an export bundle. The graph is exported and checked
against torch (``parity``), optionally quantized (``quantize``), written with the tokenizer
and a manifest of hashes into a staging folder, swapped in atomically (never over a folder
gptkit cannot prove it made), and attached to the run's MLflow record (``mlflow``)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.export.checks import model_checks
from gptkit.export.mlflow import _log_to_mlflow, mlflow_link
from gptkit.export.onnx import OPSET, _os_error, cache_shape, export_onnx, graph_opset, io_names
from gptkit.export.parity import PARITY_RTOL, parity_check
from gptkit.export.quantize import _quantize_bundle
from gptkit.model import GPT
from gptkit.registry.registry import spec_provenance
from gptkit.safeio import open_stream
from gptkit.store.bundle import MANIFEST, MODEL_FILE, folder_files, removable_bundle

_CHECKED = (("causal", "causal"), ("cache_equals_full", "cache equals full forward"))


def bundle_manifest(
    folder: Path, spec: Any, model: GPT, tokenizer: Any, precision: str = "fp32"
) -> dict[str, Any]:
    """The manifest fields every bundle has (``gptkit.store.bundle.verify_bundle`` checks
    them): the graph's inputs, outputs and cache layout, the tokenizer's special ids, the spec,
    and every file in ``folder`` (the graph and the saved tokenizer) with its hash.
    ``export_run`` adds the run, parity and quantization reports to it."""
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_stream(path, "bundle file", GptkitError) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    from gptkit.store.rundir import load_run

    out = Path(out)
    _check_replaceable(out)
    loaded = load_run(run, checkpoint=checkpoint)
    model, spec = loaded.model, loaded.spec
    link = mlflow_link(loaded.run_dir, register)  # --register without one: refused before work
    tmp = _make_staging(out)
    try:
        checks = model_checks(model, spec, spec.model.vocab_size)
        held = [n for k, n in _CHECKED if checks.get(k)] or ["none (one position)"]
        log(f"  contract checks on {checks['tokens']} tokens: {', '.join(held)}")
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
            "plugins": spec_provenance(spec),
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
    _log_to_mlflow(link, out, manifest, register, log)
    return manifest


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
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GptkitError(
            f"cannot write the bundle {out}: {blocker} is a file, not a folder",
            "Choose another --out.",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # A plain folder's mode (0777 less the umask; mkdtemp's would be 0700), so that a
        # service running as another account can read the bundle.
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(8)}"
        tmp.mkdir()
        return tmp
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
