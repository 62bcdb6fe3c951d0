"""Run directories: where a training run keeps its spec, tokenizer, checkpoints and logs.

::

    runs/<spec name>/<YYYYmmdd-HHMMSS>/
        spec.yaml           the resolved spec (vocab_size filled in)
        tokenizer/          the fitted tokenizer
        checkpoints/        see gptkit.checkpoint
        metrics.jsonl       one JSON object per logged step
        samples.txt         text sampled at each evaluation
        mlflow.json         tracking URI and run id, so a resume reopens the same MLflow run
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptkit.errors import RunError

SPEC_FILE = "spec.yaml"
RUNS_ROOT = Path("runs")


def new_run_dir(spec_name: str, root: Path = RUNS_ROOT) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / spec_name / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / spec_name / f"{stamp}-{n}"
    return path


def latest_run_dir(spec_name: str, root: Path = RUNS_ROOT) -> Path | None:
    """The newest run of a spec under ``runs/<name>/`` (by name, which is a timestamp)."""
    folder = root / spec_name
    if not folder.is_dir():
        return None
    runs = sorted(p for p in folder.iterdir() if (p / SPEC_FILE).is_file())
    return runs[-1] if runs else None


def read_run_spec(run_dir: Path, overrides=()):
    from gptkit.spec import read_spec_file, validate_spec

    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise RunError(
            f"{run_dir} is not a gptkit run directory (no {SPEC_FILE})",
            "Pass a folder made by 'gptkit train' (runs/<name>/<time>/) or an export bundle.",
        )
    return validate_spec(read_spec_file(path), str(path), overrides)


@dataclass
class LoadedRun:
    run_dir: Path
    spec: Any
    model: Any
    tokenizer: Any
    checkpoint: Path
    meta: dict[str, Any]


def resolve_run(run: str | Path) -> Path:
    """A run directory, or ``runs/<name>`` (its newest run)."""
    path = Path(run)
    if not path.exists():
        raise RunError(f"run not found: {path}", "List your runs with: ls runs/*/")
    if not path.is_dir():
        raise RunError(f"{path} is a file; expected a run directory")
    if not (path / SPEC_FILE).is_file():
        runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / SPEC_FILE).is_file())
        if runs:
            return runs[-1]
    return path


def load_run(run: str | Path, checkpoint: str = "latest", overrides=(), device: str = "cpu"):
    """Load a run's spec, tokenizer and model weights (``checkpoint``: latest, best, or step-N)."""
    from gptkit.checkpoint import load_checkpoint, read_pointer, resume_candidates
    from gptkit.components.tokenizers import load_tokenizer
    from gptkit.model import GPT

    run_dir = resolve_run(run)
    spec = read_run_spec(run_dir, overrides)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    ckpt_dir = run_dir / "checkpoints"
    if checkpoint in ("latest", "best"):
        name = read_pointer(ckpt_dir / checkpoint)
        candidates = resume_candidates(ckpt_dir) if checkpoint == "latest" else []
        if name:
            candidates = [ckpt_dir / name] + [c for c in candidates if c.name != name]
    else:
        candidates = [ckpt_dir / checkpoint]
    if not candidates:
        raise RunError(f"run {run_dir} has no checkpoint yet", "Train it: gptkit train SPEC")
    model = GPT(spec.model)
    errors = []
    for path in candidates:
        try:
            _, meta = load_checkpoint(path, model)
            return LoadedRun(run_dir, spec, model.to(device).eval(), tokenizer, path, meta)
        except RunError as exc:
            errors.append(str(exc))
    more = f" (and {len(errors) - 1} older checkpoint(s) failed too)" if len(errors) > 1 else ""
    raise RunError(f"no usable checkpoint in {ckpt_dir}: {errors[0]}{more}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line cut short by a crash is skipped."""
    import json

    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def dump_yaml(data: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
