"""Checkpoints: weights in safetensors plus a tensor-only training state, written atomically.

Layout inside a run directory::

    checkpoints/step-000250/model.safetensors   weights
    checkpoints/step-000250/state.pt            optimizer, step, RNG states (weights_only-safe)
    checkpoints/step-000250/meta.json           step, val_loss, spec fingerprint
    checkpoints/latest                          name of the newest complete checkpoint
    checkpoints/best                            name of the one with the lowest val_loss

A checkpoint is written into a hidden temporary folder, fsynced, then renamed into place; only
then does ``latest`` move (itself replaced atomically). A crash at any moment leaves the
previous checkpoint valid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from gptkit.errors import RunError
from gptkit.safeio import as_new_file, check_regular, finite_number, read_bytes, read_json

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MAX_META_BYTES = 1 << 20  # a checkpoint's meta.json: a few hundred bytes in practice


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_pointer(path: Path) -> str | None:
    """The checkpoint name a pointer file holds; ``None`` if missing, empty, or anything but
    a plain ``step-N`` name (a pointer never leads out of its folder)."""
    try:
        name = read_bytes(path, "checkpoint pointer", 64, RunError).decode("ascii", "replace")
    except RunError:  # missing, not a regular file, or too long for a step name
        return None
    name = name.strip()
    return name if _NAME.fullmatch(name) else None


_NAME = re.compile(r"step-\d{1,12}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _space_left(folder: Path) -> str:
    """`` (N MiB free on its disk)`` for an error message, or nothing if that is unknown."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:,.1f} MiB free on its disk)"


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically, move ``latest`` (and ``best``), prune old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / WEIGHTS_FILE))
        as_new_file(tmp / WEIGHTS_FILE)
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # e.g. Ctrl-C right after an evaluation saved this step
            trash = ckpt_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, OSError):
            # safetensors and torch.save report I/O failures (disk full, file too large) as
            # their own errors ("unexpected pos 95424 vs 95316"): say what the disk has left.
            raise OSError(f"{exc}{_space_left(ckpt_dir)}".strip()) from exc
        raise
    write_pointer(ckpt_dir / "latest", name)
    val = meta.get("val_loss")
    best_name = read_pointer(ckpt_dir / "best")
    best_val = _val_loss(_meta(ckpt_dir / best_name)) if best_name else None
    if val is not None and (best_val is None or val < best_val):
        write_pointer(ckpt_dir / "best", name)
        best_name = name
    _prune(ckpt_dir, keep_last, keep={name, best_name})
    return final


def _val_loss(meta: dict[str, Any]) -> float | None:
    """A checkpoint's recorded validation loss; None when it has none, or one edited into
    something that is not a number (that checkpoint then cannot stay the best)."""
    return finite_number(meta.get("val_loss"))


def _meta(path: Path) -> dict[str, Any]:
    try:
        meta = read_json(path / META_FILE, "checkpoint meta", MAX_META_BYTES, RunError)
    except RunError:
        return {}
    return meta if isinstance(meta, dict) else {}


def set_aside_after(ckpt_dir: Path, chosen: Path) -> Path | None:
    """Resuming from an older checkpoint (``--checkpoint best``): the newer ones move to
    ``checkpoints/set-aside-<time>/`` (kept, never deleted; no longer resumed or pruned), and
    ``latest``/``best`` name what is left. Returns the folder they went to, if any."""
    import time

    newer = [p for p in list_checkpoints(ckpt_dir) if p.name > chosen.name]
    if not newer:
        return None
    aside = ckpt_dir / time.strftime("set-aside-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for path in newer:
        os.replace(path, aside / path.name)
    write_pointer(ckpt_dir / "latest", chosen.name)
    scored = {p: _val_loss(_meta(p)) for p in list_checkpoints(ckpt_dir)}
    left = {p: v for p, v in scored.items() if v is not None}
    if left:
        write_pointer(ckpt_dir / "best", min(left, key=left.__getitem__).name)
    _fsync_dir(ckpt_dir)
    return aside


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        p
        for p in ckpt_dir.iterdir()
        if p.is_dir() and not p.is_symlink() and _NAME.fullmatch(p.name)
    )


def _prune(ckpt_dir: Path, keep_last: int, keep: set[str | None]) -> None:
    ckpts = list_checkpoints(ckpt_dir)
    for path in ckpts[:-keep_last] if keep_last else ckpts:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return (training state, meta). Never unpickles code."""
    for f in (WEIGHTS_FILE, STATE_FILE, META_FILE):
        if not (path / f).exists():
            raise RunError(f"checkpoint {path} is incomplete: {f} is missing")
        # torch.load and safetensors open the files themselves: a FIFO would block them.
        check_regular(path / f, f"checkpoint file {f}", error=RunError)
    _check_header(path / WEIGHTS_FILE, model)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
    except Exception as exc:
        raise RunError(f"checkpoint {path}: cannot read {WEIGHTS_FILE}: {str(exc)[:300]}") from None
    if missing or unexpected:
        raise RunError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    _check_finite(path, model)
    try:
        # weights_only=True: tensors and plain containers only. A file carrying a pickled
        # object (code) is refused here instead of being run.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"checkpoint {path}: refusing {STATE_FILE}: {_why_refused(exc)}") from None
    return state, _meta(path)


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding NaN or inf. Training never writes
    them (a step whose loss or gradient is not finite is skipped); a model of them writes
    token 0 for ever, silently."""
    return [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _check_finite(path: Path, model: torch.nn.Module) -> None:
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        n = len(bad)
        raise RunError(
            f"checkpoint {path} holds weights that are not finite (NaN or inf) in {n} "
            f"tensor{'s' if n != 1 else ''}, e.g. {bad[0]}: it cannot be used"
        )


def _why_refused(exc: Exception) -> str:
    """torch.load's refusal in a line: what it found, without its advice to load the file
    unsafely (which would run whatever code the file carries)."""
    text = str(exc)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return f"it would import {code[1]} (code, not tensors); not run, not loaded"
    if "Weights only load failed" in text:
        found = [line.strip() for line in text.splitlines() if "Unsupported" in line]
        return f"not a file of tensors ({(found or ['unreadable'])[0][:120]})"
    return text.splitlines()[0][:300] if text else type(exc).__name__


# safetensors' names for floating-point tensors
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def _check_header(file: Path, model: torch.nn.Module) -> None:
    """Compare tensor shapes and types from the safetensors header with the model, for a
    short message."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            shapes = {k: list(v.get_shape()) for k, v in slices.items()}
            dtypes = {k: v.get_dtype() for k, v in slices.items()}
    except Exception as exc:
        raise RunError(
            f"checkpoint {file.parent}: {WEIGHTS_FILE} is unreadable "
            f"(truncated or not safetensors): {str(exc)[:200]}"
        ) from None
    wanted = {k: list(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k in shapes if k in wanted and shapes[k] != wanted[k]]
    if bad:
        k = bad[0]
        raise RunError(
            f"checkpoint {file.parent} does not fit this model: {len(bad)} tensors differ in "
            f"shape (e.g. {k}: {shapes[k]} in the checkpoint, {wanted[k]} in the model)",
            "Was spec.yaml edited? The model must be built from the spec it was trained with.",
        )
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    ints = [k for k in shapes if k in floats and dtypes[k] not in FLOAT_DTYPES]
    if ints:  # loaded, they would be cast: weights truncated to whole numbers, silently
        raise RunError(
            f"checkpoint {file.parent}: {len(ints)} weight tensors are not floating point "
            f"(e.g. {ints[0]}: {dtypes[ints[0]]}); training writes floats: it cannot be used"
        )


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try on resume: the one ``latest`` names, then older ones, newest first."""
    ckpts = list(reversed(list_checkpoints(ckpt_dir)))
    latest = read_pointer(ckpt_dir / "latest")
    if latest and (ckpt_dir / latest) in ckpts:
        ckpts.remove(ckpt_dir / latest)
        ckpts.insert(0, ckpt_dir / latest)
    return ckpts


def checkpoint_candidates(ckpt_dir: Path, which: str = "latest") -> list[Path]:
    """Checkpoints to try for ``which`` (latest, best, or step-N), best guess first."""
    if which == "latest":
        found = resume_candidates(ckpt_dir)
        latest = read_pointer(ckpt_dir / "latest")
        if latest and found and found[0].name != latest:
            print(
                f"gptkit: warning: {ckpt_dir / 'latest'} names {latest}, which is not a "
                f"complete checkpoint folder (missing, or a link); trying the newest that is",
                file=sys.stderr,
            )
        return found
    if which == "best":
        name = read_pointer(ckpt_dir / "best")
        return [ckpt_dir / name] if name else []
    if not _NAME.fullmatch(which):
        raise RunError(
            f"--checkpoint {which!r}: use latest, best, or step-N (a folder in {ckpt_dir})"
        )
    if not (ckpt_dir / which).is_dir():
        have = ", ".join(p.name for p in list_checkpoints(ckpt_dir)) or "none"
        raise RunError(f"no checkpoint {which} in {ckpt_dir}; available: {have}")
    return [ckpt_dir / which]
