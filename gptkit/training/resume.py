"""Which run a ``--resume`` continues, and with which spec: the one place resume discovery
lives (the CLI, the trainer and sweeps ask here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptkit.errors import RunError
from gptkit.store.rundir import RUNS_ROOT, RunDir


def fingerprint(spec: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model and the tokenizer."""
    return {
        "model": spec.model.model_dump(mode="json"),
        "tokenizer": spec.tokenizer.model_dump(mode="json"),
    }


def spec_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old, new) for every field that differs between two spec dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += spec_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def run_to_resume(spec_name: str, path: Path | None = None) -> RunDir:
    """``path`` if it holds a run, else (no path) the newest run of ``spec_name``."""
    found = RunDir(path) if path else RunDir.latest(RUNS_ROOT / spec_name)
    if found is None:
        raise RunError(
            f"nothing to resume: no run of '{spec_name}' under {RUNS_ROOT / spec_name}",
            "Start it without --resume.",
        )
    if not found.path.exists():
        raise RunError(
            f"nothing to resume: {found.path} does not exist",
            "Check the path (gptkit runs lists the runs), or start it without --resume.",
        )
    if not found.is_run():
        raise RunError(
            f"nothing to resume in {found.path}: it is not a gptkit run (no spec.yaml)",
            "Start it without --resume.",
        )
    return found


@dataclass
class Resumption:
    """What ``gptkit train --resume`` continues: the run's own spec (with this command's
    ``--set`` changes), its folder, and what the user should be told."""

    spec: Any
    run_dir: Path
    notes: list[str] = field(default_factory=list)


def resume_spec(spec_file: Path | None, run_dir: Path | None, sets: list[str]) -> Resumption:
    """The run's own spec (what was asked), with ``sets`` on top. A spec file names the run
    to continue when no ``run_dir`` is given; its differences from the run are reported, not
    applied (a resume continues what was started)."""
    from gptkit.spec.files import load_spec

    from_file = load_spec(spec_file, sets) if spec_file is not None else None
    notes = []
    if run_dir is None:
        if from_file is None:
            raise RunError("--resume needs --run-dir RUN or a SPEC whose newest run to continue")
        run = run_to_resume(from_file.name)
        notes.append(f"resuming {run.path} (newest run of '{from_file.name}')")
    else:
        run = run_to_resume("", run_dir)
    resolved = run.read_spec(sets)
    if spec_file is not None and from_file is not None:
        notes += _spec_file_ignored(spec_file, from_file, resolved)
    return Resumption(resolved, run.path, notes)


def _spec_file_ignored(path: Path, from_file: Any, resolved: Any) -> list[str]:
    diffs = [
        (k, a, b)
        for k, a, b in spec_diff(resolved.to_dict(), from_file.to_dict())
        if k != "model.vocab_size"
    ]
    if not diffs:
        return []
    shown = "; ".join(f"{k}: {a!r} in the run, {b!r} in {path.name}" for k, a, b in diffs[:5])
    return [
        f"warning: the run continues its own spec; {path} differs and is not "
        f"applied ({shown}). Pass --set FIELD=VALUE to change a field on purpose."
    ]
