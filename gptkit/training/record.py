"""The run's record: ``metrics.jsonl`` in the run folder and the MLflow run beside it.

What MLflow shows is what was trained: params are the spec *as it was in force* (resolved
tracking URI, the device and precision used, no nulls standing for defaults, no fields that did
not apply), the dataset is an MLflow dataset input (source, content sha256, tokenizer), the git
commit and plugin versions are tags, the description is the command that made the run, start
and end times are the training's own, and summary metrics (best/final val loss, total tokens,
wall time, mean tokens/s) sit beside the per-step curves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gptkit.registry.registry import spec_provenance
from gptkit.safeio import finite_number
from gptkit.training.tracking import PARAM_TAG, Tracker, flatten, resolve_uri


def params_in_force(spec: Any, facts: dict[str, Any]) -> dict[str, str]:
    """The flattened spec with every default replaced by what was really used."""
    data = spec.to_dict()
    data.pop("sweep", None)
    train = data["train"]
    train["device"], train["precision"] = facts["device"], facts["precision"]
    train["threads"] = facts["threads"]
    train["checkpoint_every"] = train.get("checkpoint_every") or train["eval_every"]
    if facts["world"] > 1:
        train["world_size"] = facts["world"]
    else:
        train.pop("parallel", None)  # no effect on one process
    data["tracking"].update(uri=facts["uri"], experiment=facts["experiment"])
    data["model"]["d_ff"] = spec.model.hidden_dim
    if not data["model"].get("preset"):
        data["model"].pop("preset", None)
    params = {k: v for k, v in flatten(data).items() if v != "null"}
    params["n_params"] = str(facts["n_params"])
    return params


def changed_params(before: Any, now: Any, facts: dict[str, Any]) -> dict[str, str]:
    """``PARAM_TAG`` tags for the params that differ between two specs of one run."""
    old, new = params_in_force(before, facts), params_in_force(now, facts)
    return {
        PARAM_TAG + key: new.get(key, "null")[:5000]
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the working tree the run was started from, if it is a git checkout."""
    out = _git(cwd, "rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty(cwd: Path | None = None) -> bool | None:
    """Whether tracked files of that checkout differ from its commit (None: not known)."""
    out = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def _git(cwd: Path | None, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def description_tags(
    command: str | None, where: str, spec_name: str, overrides: list[str] | None
) -> dict[str, str]:
    """What a run (or a sweep's parent) says of itself in MLflow: the command that made it and
    its folder (``where``) as the description, the spec's name, its overrides, gptkit's version
    and the code (:func:`code_tags`)."""
    tags = {
        "mlflow.note.content": f"`{command or 'gptkit (Python API)'}`\n\n{where}".rstrip(),
        "gptkit.version": __import__("gptkit").__version__,
        "gptkit.spec_name": spec_name,
        **code_tags(),
    }
    if overrides:
        tags["gptkit.overrides"] = " ".join(overrides)[:5000]
    return tags


def code_tags() -> dict[str, str]:
    """Which code trained the run: the commit of the folder it was started in (MLflow's own
    tag) and whether its tracked files had changes, and for a gptkit run from a git checkout
    (an editable install) gptkit's own commit and changes."""
    tags = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        if (dirty := git_dirty()) is not None:
            tags["gptkit.source.git.dirty"] = str(dirty).lower()
    here = Path(__file__).resolve().parents[1]  # the gptkit package
    own = git_commit(here) if (here.parent / ".git").exists() else None
    if own:
        tags["gptkit.code.git.commit"] = own
        if (dirty := git_dirty(here)) is not None:
            tags["gptkit.code.git.dirty"] = str(dirty).lower()
    return tags


def _started(trainer: Any) -> float:
    """When the run began: this command, or for a resumed run the one that made it
    (run.json's ``created``); the MLflow run's start time."""
    created = finite_number(trainer.rundir.info().get("created")) if trainer.resume else None
    return created if created is not None and created > 0 else float(trainer._created)


def dataset_input(trainer: Any) -> dict[str, str]:
    """The training data as an MLflow dataset: source, content digest, tokenizer."""
    data, spec = trainer.data, trainer.spec
    source = spec.data.source if isinstance(spec.data.source, str) else ",".join(spec.data.source)
    sha = str((getattr(data, "meta", None) or {}).get("content_sha256") or "")
    if not sha:  # an entry made before the hash was kept: the token ids themselves
        sha = token_digest(data)
    profile = {
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "tokenizer": spec.tokenizer.kind,
        "vocab_size": spec.model.vocab_size,
        "sha256": sha,
    }
    return {
        "name": Path(source).name or source,
        "digest": sha[:36],  # MLflow keeps at most 36 characters; the profile has all 64
        "source_type": "local" if source != "tinyshakespeare" else "gptkit-embedded",
        "source": source,
        "profile": json.dumps(profile),
    }


def token_digest(data: Any) -> str:
    """sha256 over the train and validation token ids (in the cache's dtype)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for part in (data.train, data.val):
        for start in range(0, len(part), 1 << 24):
            h.update(np.asarray(part[start : start + (1 << 24)]).tobytes())
    return h.hexdigest()


class RunRecord:
    """Writes metrics to the run folder and, when tracking is on, to MLflow."""

    def __init__(self, trainer: Any, tracker: Tracker | None) -> None:
        self.trainer, self.tracker = trainer, tracker

    @property
    def url(self) -> str | None:
        return self.tracker.url if self.tracker is not None else None

    @classmethod
    def start(cls, trainer: Any) -> RunRecord:
        spec = trainer.spec
        if not spec.tracking.enabled:
            return cls(trainer, None)
        tracker = cls._tracker(trainer)
        uri, experiment = tracker.uri, tracker.experiment
        record = cls(trainer, tracker)
        # A run whose store was down from its start has its description in the spool: it is
        # sent first (the MLflow run made then), and this session is a resume of it.
        described = any(event.get("op") == "params" for event in tracker.pending)
        if trainer.resume and (tracker.run_id or described):
            if tracker.run_id:
                tracker.reopen()
            record._tag_resume(record._facts(uri, experiment))
        else:
            record._describe(uri, experiment)
        return record

    @classmethod
    def spooled(cls, trainer: Any) -> RunRecord:
        """For a resume with nothing to train: the events a down store left in the spool,
        sent as they were (nothing added: no resume tag, no new end time)."""
        return cls(trainer, cls._tracker(trainer))

    @staticmethod
    def _tracker(trainer: Any) -> Tracker:
        """The run's tracker: its resolved store, its experiment (the spec's name unless
        ``tracking.experiment`` says otherwise), its start time."""
        spec = trainer.spec
        return Tracker(
            resolve_uri(spec.tracking.uri),
            spec.tracking.experiment or spec.name,
            trainer.run_dir,
            trainer.run_name,
            warn=lambda m: print(f"gptkit: warning: {m}", file=sys.stderr, flush=True),
            parent_run_id=trainer.parent_run_id,
            start_time=int(_started(trainer) * 1000),
            on_created=lambda url: trainer.progress.print(f"MLflow run: {url}"),
        )

    def send_spooled(self) -> int:
        """Send what waits in the spool and nothing else; returns the events still left."""
        assert self.tracker is not None
        self.tracker.on_created = lambda url: None  # the URL is printed below, once
        spooled = self.tracker.close(end=False)
        self._report_spool(spooled)
        return spooled

    def _facts(self, uri: str, experiment: str) -> dict[str, Any]:
        """What the params record besides the spec: how the run really ran."""
        import torch

        trainer = self.trainer
        return {
            "device": trainer.device.type,
            "precision": "bf16" if trainer.bf16 else "fp32",
            "threads": torch.get_num_threads(),
            "world": trainer.dist.world,
            "uri": uri,
            "experiment": experiment,
            "n_params": trainer.model.num_params(non_embedding=False),
        }

    def _describe(self, uri: str, experiment: str) -> None:
        trainer, tracker = self.trainer, self.tracker
        tracker.log_params(params_in_force(trainer.spec, self._facts(uri, experiment)))
        # the command that made the run (a resume's, when the run had no record before)
        made_by = (trainer.rundir.info().get("command") if trainer.resume else None) or (
            trainer.command
        )
        tags = description_tags(
            made_by, f"run folder: {Path(trainer.run_dir).resolve()}", trainer.spec.name,
            trainer.overrides,
        )  # fmt: skip
        for key, info in spec_provenance(trainer.spec).items():
            tags[f"gptkit.plugin.{key}"] = f"{info['distribution']} {info['version']}"
        tracker.set_tags(tags)
        tracker.log_dataset(dataset_input(trainer))

    def _tag_resume(self, facts: dict[str, Any]) -> None:
        """Tag the resume, and what it changed. An MLflow param cannot change, so a param the
        resume changed is the tag ``gptkit.param.<key>`` from then on (``null``: no longer
        set), which ``gptkit compare`` reads over the params."""
        trainer = self.trainer
        step = trainer.state.step
        tags = {f"gptkit.resumed_at.{step}": trainer.command or "resume"}
        if trainer.changes:
            tags[f"gptkit.resume_changes.{step}"] = "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, a, b in trainer.changes
            )[:5000]
        if trainer.changes and trainer.spec_before is not None:
            tags.update(changed_params(trainer.spec_before, trainer.spec, facts))
        self.tracker.set_tags(tags)

    def metrics(self, row: dict[str, Any]) -> None:
        self.trainer.rundir.append_metrics(row)
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])

    def close(self, status: str, summary: dict[str, Any]) -> int:
        """Plot, attach the files, log the summary, end the MLflow run. Returns events left
        in the spool."""
        run = self.trainer.rundir
        try:
            plot_losses(run.metrics_file, run.loss_plot, self.trainer.run_name)
        except Exception as exc:  # a plot is never worth failing a run over
            print(f"gptkit: warning: no loss plot: {exc}", file=sys.stderr)
        if self.tracker is None:
            return 0
        tracker = self.tracker
        final = {
            f"summary.{k}": float(v)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and v is not None
        }
        if final:
            tracker.log_metrics(final, int(summary["steps"]))
        if summary.get("stop_reason"):
            tracker.set_tags({"gptkit.stop_reason": str(summary["stop_reason"])})
        for path in run.artifacts():
            tracker.log_artifact(path)
        if run.tokenizer_dir.is_dir():
            tracker.log_artifact(run.tokenizer_dir, "tokenizer")
        tracker.on_created = lambda url: None  # the URL is printed below, once
        spooled = tracker.close(status)
        self._report_spool(spooled)
        return spooled

    def _report_spool(self, spooled: int) -> None:
        assert self.tracker is not None
        if spooled:
            print(
                f"gptkit: warning: {spooled} MLflow events could not be sent; they are "
                f"kept in {self.trainer.rundir.spool_file} and sent on --resume",
                file=sys.stderr,
            )
        if self.tracker.url:
            print(f"MLflow run: {self.tracker.url}", file=sys.stderr)


def plot_losses(metrics: Path, out: Path, title: str) -> None:
    """Train and validation loss against step, as a PNG. Drawn on a bare Figure, so the
    process's pyplot backend (a notebook's inline one, say) is left as it was."""
    from matplotlib.figure import Figure

    from gptkit.store.rundir import read_jsonl

    rows = read_jsonl(metrics)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
