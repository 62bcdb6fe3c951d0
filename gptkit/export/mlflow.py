"""The export's MLflow record: the bundle attached to its training run (never on the critical path:
a tracking failure warns)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import GptkitError, RunError
from gptkit.store.bundle import MODEL_FILE


def _log_to_mlflow(
    info: dict[str, Any] | None,
    bundle: Path,
    manifest: dict[str, Any],
    register: str | None,
    log,
) -> None:
    """Attach the bundle and an ONNX-flavour model to the MLflow run ``info`` links to (the
    run's ``mlflow_link``), under a name of its own (``onnx-fp32``, ``onnx-int8``, then
    ``-2``, ``-3`` ...), without moving the training run's times or status. Never fatal unless
    ``--register`` was asked for."""
    from gptkit.training.tracking import quick_timeouts

    if not info:
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


def mlflow_link(run_dir: Path, register: str | None) -> dict[str, Any] | None:
    """The run's link to its MLflow run (None if it has none); with ``register`` a missing
    link is an error, raised before anything is exported."""
    from gptkit.store.rundir import RunDir
    from gptkit.training.tracking import read_mlflow_link

    info = read_mlflow_link(RunDir(run_dir))
    if not info and register:
        raise RunError(
            f"--register needs the run's MLflow record "
            f"({RunDir(run_dir).mlflow_file} is missing or damaged)",
            "Train with tracking on to register its model, or export without --register.",
        )
    return info


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
