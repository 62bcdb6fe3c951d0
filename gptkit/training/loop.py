"""The trainer: batches of random windows, the spec's optimizer, warmup + decay, evaluation,
checkpoints, exact resume, MLflow tracking.

The loop body reads like nanoGPT's: set up → (step → log → evaluate → checkpoint)* → finish.
Everything a resume needs is one ``TrainState`` (plus the optimizer's own state), saved whole in
each checkpoint; every random stream lives there (dropout per rank, batch positions), so a run
killed at any moment and resumed ends with the same weights, bit for bit on CPU, as one that
never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gptkit.data.batches import get_batch
from gptkit.errors import GptkitError, RunError
from gptkit.model import GPT
from gptkit.spec.models import ExperimentSpec
from gptkit.store.checkpoint import (
    checkpoint_candidates,
    checkpoint_name,
    read_pointer,
    resume_candidates,
    set_aside_after,
)
from gptkit.store.checkpoint import load_checkpoint as load_checkpoint_files
from gptkit.store.rundir import RunDir
from gptkit.store.writer import CheckpointWriter
from gptkit.training.device import pick_device, tune, use_bf16
from gptkit.training.distributed import Dist
from gptkit.training.progress import Progress, one_line, progress_sample
from gptkit.training.resume import fingerprint, run_to_resume, spec_diff
from gptkit.training.state import TrainState
from gptkit.training.tracking import resolve_uri

EVAL_SEED_OFFSET = 1_000_003
# Where a run's wall time goes besides its training steps (the "done" line's breakdown).
PHASES = ("evaluation", "samples", "checkpoints", "tracking")


class TrainingError(GptkitError):
    """Training could not go on (e.g. the loss kept diverging)."""

    exit_code = 1


class Interrupted(GptkitError):
    """Stopped by Ctrl-C / SIGTERM after writing a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    """What one ``SpecTrainer.run`` did (figures are for this process's session only)."""

    run_dir: Path
    step: int
    steps_trained: int
    val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    tokens_per_sec: float
    skipped_steps: int
    spooled_events: int
    mlflow_url: str | None = None
    stop_reason: str = "max_steps"  # max_steps | early_stop | interrupted | failed
    # Seconds of ``elapsed`` spent outside the training steps: "evaluation", "samples",
    # "checkpoints" (the part the loop waited for; a background write is not counted) and
    # "tracking" (the run's record closed: plot, MLflow artifacts and end).
    phases: dict[str, float] = field(default_factory=dict)
    tracked: bool = False  # tracking.enabled (the MLflow run may not exist: a down server)


def lr_at(step: int, train: Any) -> float:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio`` (or
    constant)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    min_lr = train.lr * train.min_lr_ratio
    if train.schedule == "linear":
        return train.lr - (train.lr - min_lr) * progress
    return min_lr + 0.5 * (train.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float) -> None:
    """Scale every param group's own learning rate by the schedule: a group built with half
    the base lr keeps half of the scheduled lr (the group's ``initial_lr`` is its peak)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr / peak


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Can ``optimizer`` skip a step on the device, given a ``found_inf`` flag there? torch's
    fused Adam and AdamW can: their kernel leaves the weights, moments and step count as they
    were. Then nothing has to be read back before the step is taken. (Fused SGD cannot:
    skipping its first step leaves the momentum buffer uninitialised.)"""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: np.ndarray, spec: ExperimentSpec, device, autocast
) -> float:
    """Mean loss over ``eval_batches`` fixed batches (the same ones at every evaluation)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(spec.seed + EVAL_SEED_OFFSET)
    losses = []
    for _ in range(spec.train.eval_batches):
        x, y = get_batch(data, spec.train.batch_size, spec.model.max_seq_len, gen, device)
        with autocast():
            losses.append(model(x, y).loss.detach().float())
    model.train(was_training)
    # One copy to the host at the end: on a GPU, a .item() per batch waited for each one.
    return float(np.mean(torch.stack(losses).tolist()))


class SpecTrainer:
    """Train an ``ExperimentSpec`` in a run directory (new, or resumed).

    ``overrides`` and ``command`` are recorded with the run (what was asked, and how), so a
    resume continues exactly that.
    """

    def __init__(
        self,
        spec: ExperimentSpec,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        model: GPT | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        command: str | None = None,
        started_at: float | None = None,
        checkpoint: str = "latest",
        on_eval: Any = None,
    ) -> None:
        self.spec = spec
        # on_eval(step, val_loss) -> True to stop the run here (a search's pruner).
        self.on_eval = on_eval
        self.pruned = False
        self.resume_from = checkpoint  # on resume: latest, best or step-N
        self.started_at = started_at  # when the command began (the MLflow run's start)
        self.initial_model = model  # train this instance instead of a fresh one
        self.parent_run_id = parent_run_id
        self.resume = resume
        self.show_progress = progress
        self.overrides = list(overrides)
        self.command = command
        self.dist = Dist()
        if self.dist.world > 1 and spec.train.batch_size % self.dist.world:
            raise GptkitError(
                f"train.batch_size ({spec.train.batch_size}) must be divisible by the number of "
                f"processes ({self.dist.world}): it is the global batch, split across them"
            )
        if spec.tracking.enabled and self.dist.main:
            resolve_uri(spec.tracking.uri)  # a store that is not MLflow's: refused before a run
        # Rank 0 picks the folder (a new one is named by the clock) and tells the others.
        chosen = (
            self._choose_run_dir(Path(run_dir) if run_dir else None) if self.dist.main else None
        )
        self.rundir = RunDir(Path(self.dist.broadcast(str(chosen.path) if chosen else None) or "."))
        recorded = self._recorded_info()  # read (and a damaged one named) whatever the name
        self.run_name = run_name or recorded.get("name") or self.rundir.path.name
        self._stop_signal: str | None = None
        # Checkpoints beside training; the host copy of the weights is built on the CPU.
        self.writer = CheckpointWriter(self._write_failed, lambda m: GPT(m.spec))
        self.idle = False
        self._made_folder = False  # set when the run takes its folder: made by it, or not
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self._timing = False  # inside a block counted by _timed
        self.changes: list[tuple[str, Any, Any]] = []  # (field, before, now) on a resume
        self.spec_before: Any = None  # the run's spec before this resume changed it

    @property
    def run_dir(self) -> Path:
        return self.rundir.path

    @property
    def stop_signal(self) -> str | None:
        """The signal (SIGINT, SIGTERM) asked to stop this run, if one did; after ``run()``
        returns normally, it came as the run was ending (the run finished anyway)."""
        return self._stop_signal

    def _choose_run_dir(self, path: Path | None) -> RunDir:
        if self.resume:
            return run_to_resume(self.spec.name, path)
        if path is None:
            return RunDir.new(self.spec.name)
        run = RunDir(path)
        run.check_writable_target()
        if resume_candidates(run.checkpoints) or run.is_run():
            raise RunError(
                f"{path} already holds a run",
                "Add --resume to continue it, or choose another --run-dir.",
            )
        return run

    def _recorded_info(self) -> dict[str, Any]:
        """The run's run.json; one that cannot be read (edited by hand, damaged) is said to be
        written anew on a resume, which loses what it held (command, overrides, resumes)."""
        try:
            return self.rundir.read_info()
        except RunError as exc:
            if self.resume and self.dist.main:
                print(
                    f"gptkit: warning: {exc}; it is written anew from this resume (the command, "
                    "overrides and resumes it recorded are lost)",
                    file=sys.stderr,
                )
            return {}

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        """Seed, device, data, model, optimizer; on resume, the checkpoint's state."""
        spec = self.spec
        torch.manual_seed(spec.seed)
        if spec.train.threads:
            torch.set_num_threads(spec.train.threads)
        self.device = pick_device(spec.train.device)
        self.bf16 = use_bf16(spec.train.precision, self.device)
        tune(self.device)
        self._prepare_data()
        if self.dist.main:
            self._made_folder = not self.rundir.path.exists()  # (removed if interrupted now)
            self.rundir.lock()  # one writer per run, from here on
        self.model = self._build_model()
        self.data_gen = torch.Generator().manual_seed(spec.seed)
        self.state, saved = TrainState(), None
        if self.resume:  # weights go into the whole model, before any sharding
            self.state, saved = self._restore()
        self.fsdp = self.dist.enabled and spec.train.parallel == "fsdp"
        if self.fsdp:
            self._shard()
        self.optimizer = spec.train.optimizer.build(self.model, lr=spec.train.lr)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if saved is not None and saved.get("optimizer") is not None:
            self._load_optimizer(saved)
        self.forward = self._wrap_for_speed()
        # With an optimizer that skips non-finite steps itself (fused, one process), the loss
        # and gradient norm stay on the device until a step that logs, evaluates or writes a
        # checkpoint: on a GPU, reading them every step made the host wait for each one.
        self.defer_reads = not self.dist.enabled and skips_on_device(self.optimizer)
        self.pending: list[tuple[int, float, Any]] = []  # (step, lr, loss and norm) not read
        self.window_start = time.perf_counter()
        # A resume with nothing to train (at max_steps, or patience spent) changes nothing:
        # not the run's files, not its MLflow record (end time, tags); MLflow events spooled
        # while the store was down are sent as they were recorded (their end time included).
        self.idle = (
            self.resume
            and (self.state.step >= spec.train.max_steps or self.patience_spent())
            and self.rundir.info().get("status") == "FINISHED"  # else its end is recorded now
        )
        if self.dist.main and not self.idle:
            self._record_run()

    def _prepare_data(self) -> None:
        from gptkit.data.prepare import prepare_tokens

        spec, d = self.spec, self.dist
        if not d.main:
            d.barrier()  # rank 0 fills the token cache first
        self.data = prepare_tokens(spec.data, spec.tokenizer, min_len=spec.model.max_seq_len + 1)
        if d.main:
            d.barrier()
        tok = self.data.tokenizer
        vocab = spec.model.vocab_size or tok.vocab_size
        if vocab < tok.vocab_size:
            raise GptkitError(
                f"model.vocab_size is {vocab} but the tokenizer has {tok.vocab_size} tokens",
                "Leave model.vocab_size unset to take the tokenizer's.",
            )
        self.spec = spec.model_copy(
            update={"model": spec.model.model_copy(update={"vocab_size": vocab})}
        )
        if self.resume and d.main:
            self._check_resumable()

    def _check_resumable(self) -> None:
        """Refuse a resume that would change what the checkpoints mean (nothing written yet)."""
        old = self.rundir.read_spec()
        diffs = spec_diff(fingerprint(old), fingerprint(self.spec))
        if diffs:
            shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diffs[:6])
            raise RunError(
                f"cannot resume {self.run_dir}: the model or tokenizer would change: {shown}",
                "Only fields outside model: and tokenizer: (such as train.max_steps) may "
                "change on resume; start a new run for a different model.",
            )
        from gptkit.components.tokenizers import load_tokenizer

        saved = load_tokenizer(self.rundir.tokenizer_dir, spec_class=type(self.spec.tokenizer))
        if saved.state() != self.data.tokenizer.state():
            raise RunError(
                f"cannot resume {self.run_dir}: the data would give it a different tokenizer "
                f"than the one its checkpoints were trained with ({self.rundir.tokenizer_dir})",
                "Resume on the same data.source, or start a new run.",
            )
        self.changes = [c for c in spec_diff(old.to_dict(), self.spec.to_dict())]
        self.spec_before = old

    def _build_model(self) -> GPT:
        spec = self.spec
        if self.initial_model is None:
            return GPT(spec.model).to(self.device)
        if self.initial_model.spec.model_dump(exclude={"vocab_size"}) != spec.model.model_dump(
            exclude={"vocab_size"}
        ):
            raise GptkitError(
                "the model passed in does not match the spec's model: build it from that spec"
            )
        return self.initial_model.to(self.device)

    def _restore(self) -> tuple[TrainState, dict[str, Any]]:
        """The newest usable checkpoint's weights (into the model) and state."""
        errors = []
        for path in checkpoint_candidates(self.rundir.checkpoints, self.resume_from):
            try:
                saved, _ = load_checkpoint_files(path, self.model)
                state = TrainState.from_checkpoint(saved, f"checkpoint {path}")
                state.restore_rngs(self.dist.rank, self.data_gen, self.device)
            except (RunError, RuntimeError) as exc:
                errors.append(str(exc))
                print(f"gptkit: warning: skipping unusable checkpoint: {exc}", file=sys.stderr)
                continue
            if self.dist.main:
                print(f"resuming {self.run_dir} from {path.name} (step {state.step})", flush=True)
            self._resumed_from = path
            return state, saved
        raise RunError(
            f"cannot resume {self.run_dir}: no usable checkpoint"
            + (": " + "; ".join(errors) if errors else " (none written yet)"),
            "Start a new run without --resume.",
        )

    def _shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        # FSDP2: each block's parameters are split across processes and gathered only
        # while that block runs; the root wraps what is left (embeddings, final norm).
        for block in self.model.blocks:
            fully_shard(block)
        fully_shard(self.model)

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        if self.fsdp != (saved.get("optimizer_format") == "full"):
            raise RunError(
                "this checkpoint's optimizer state was saved with "
                f"train.parallel={'fsdp' if not self.fsdp else 'ddp or one process'}; "
                "resume it the same way"
            )
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_optimizer_state_dict,
                )

                set_optimizer_state_dict(
                    self.model,
                    self.optimizer,
                    saved["optimizer"],
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                self.optimizer.load_state_dict(saved["optimizer"])
                # The implementation is this session's choice (the device, the spec), not the
                # checkpoint's: a run started on the CPU and resumed on CUDA gets fused AdamW.
                for group in self.optimizer.param_groups:
                    for key in ("fused", "foreach"):
                        if key in self.optimizer.defaults:
                            group[key] = self.optimizer.defaults[key]
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise RunError(
                f"cannot resume {self.run_dir}: the checkpoint's optimizer state "
                f"does not fit train.optimizer ({str(exc)[:200]})"
            ) from None
        for group in self.optimizer.param_groups:  # a resumed run keeps its own peaks
            group.setdefault("initial_lr", group["lr"])

    def _wrap_for_speed(self) -> torch.nn.Module:
        mode = self.spec.train.compile
        forward = (
            torch.compile(self.model, mode=None if mode is True else mode) if mode else self.model
        )
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            # Gradients are averaged across processes in backward: one optimizer step over the
            # global batch, the same on every rank.
            forward = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return forward

    def _interrupted_in_setup(self) -> Interrupted:
        """Ctrl-C while the run was being set up: nothing was trained; a new run's folder that
        holds nothing yet is removed (a later run would have reused it anyway)."""
        folder = self.rundir.path
        if self._made_folder and self.dist.main and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        if self.resume:
            return Interrupted(
                f"interrupted while the run was being set up: nothing was trained; {folder} "
                "is as it was",
                f"Continue it with: {self.resume_hint()}",
            )
        return Interrupted("interrupted while the run was being set up: nothing was trained")

    def _record_run(self) -> None:
        """Write what the run is (spec, tokenizer, name, command, provenance), now that the
        resume (if any) is known to work; a refused resume has changed nothing."""
        from gptkit.registry.registry import spec_provenance

        run = self.rundir
        if self.resume and self.resume_from != "latest":
            aside = set_aside_after(run.checkpoints, self._resumed_from)
            if aside is not None:
                print(f"checkpoints after {self._resumed_from.name} set aside in {aside}")
        if self.resume:
            run.truncate_metrics(self.state.step)
            resumes = run.info().get("resumes", [])
            resumes.append(
                {
                    "step": self.state.step,
                    "time": time.time(),
                    "command": self.command,
                    "changes": {k: [a, b] for k, a, b in self.changes},
                }
            )
            run.update_info(resumes=resumes, status="RUNNING")
        else:
            self.data.tokenizer.save(run.tokenizer_dir)
            run.update_info(
                name=self.run_name,
                spec_name=self.spec.name,
                created=time.time(),
                command=self.command,
                overrides=self.overrides,
                status="RUNNING",
            )
        run.write_spec(self.spec)
        provenance = spec_provenance(self.spec)
        if provenance:
            from gptkit.store.rundir import atomic_write_text

            atomic_write_text(run.plugins_file, json.dumps(provenance, indent=2))

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _output_lost(self) -> None:
        """Standard output went away: stop at the next step, with a checkpoint."""
        self._stop_signal = self._stop_signal or "its output closing"

    def _install_signals(self) -> dict[int, Any]:
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        # SIGHUP: the terminal (or ssh session) running it closed.
        hangup = [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []
        for sig in (signal.SIGINT, signal.SIGTERM, *hangup):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return previous

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        """Train to ``train.max_steps``; returns what this session did."""
        from gptkit.training.record import RunRecord

        self._created = self.started_at or time.time()  # the MLflow run's start
        try:
            self._setup()
        except BaseException as exc:
            if self.dist.main:
                self.rundir.unlock()
            if isinstance(exc, KeyboardInterrupt):  # before the first step: said, not silent
                raise self._interrupted_in_setup() from None
            raise
        t = self.spec.train
        self.tokens_per_step = t.batch_size * self.spec.model.max_seq_len * t.grad_accum_steps
        self.first_step = self.state.step
        self.progress = Progress(
            t.max_steps,
            self.state.step,
            self.show_progress,
            quiet=not self.dist.main,
            on_lost=self._output_lost,
        )
        self.record = None
        if self.dist.main and not self.idle:
            self.record = RunRecord.start(self)
        elif self.dist.main and self.rundir.spool_file.exists():
            self.record = RunRecord.spooled(self)  # idle: only the waiting events are sent
        self._started = time.time()  # training time counts from here
        self._announce()
        previous_handlers = self._install_signals()
        status = "FAILED"
        try:
            self._fit()
            status = "FINISHED"
        except Interrupted:
            status = "KILLED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise Interrupted(
                f"interrupted at step {self.state.step} (no checkpoint written for it)",
                f"Resume from the last checkpoint: {self.resume_hint()}",
            ) from None
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            try:
                self._settle_checkpoint()
            finally:  # a second Ctrl-C while a write completes: the run is still recorded
                self.progress.close()
                with self._timed("tracking"):
                    spooled = self._finish(status)
        # Every rank waits here for the others' last collectives (the checkpoint's state-dict
        # gathers are asynchronous under FSDP): a rank that exited with one still in flight
        # let gloo's worker thread free its tensors during interpreter teardown, which aborts
        # the process ("terminate called without an active exception").
        self.dist.barrier()
        return self._result(spooled)

    def _fit(self) -> None:
        """The steps, then the end: the last checkpoint on disk, and a run that ended on
        non-finite steps reported as failed."""
        state = self.state
        self.model.train()
        try:
            self._steps()
        except BaseException:
            self._read_what_is_left()
            raise
        with self._timed("checkpoints"):
            self.writer.wait()  # the last checkpoint is on disk before the run is recorded
        if state.bad_in_a_row:
            self._checkpoint()  # the weights are the last good ones; keep the step counters
            raise TrainingError(
                f"training ended on {state.bad_in_a_row} non-finite step(s) (loss or gradient); "
                f"the weights are those of the last good step, in {self._latest_checkpoint()}",
                "Lower train.lr, set train.grad_clip, or check the data.",
            )

    def _steps(self) -> None:
        """The loop: step → log → evaluate → checkpoint, until max_steps (or a stop)."""
        t, state = self.spec.train, self.state
        while state.step < t.max_steps and not self.patience_spent() and not self.pruned:
            self._stop_if_asked()
            if not self.pending:
                self.window_start = time.perf_counter()
            lr = lr_at(state.step, t)
            self.pending.append((state.step + 1, lr, self._train_step(lr)))
            state.step += 1
            self.writer.check()  # a background checkpoint write that failed stops the run
            if not self._read_due():
                self.progress.advance(state.step)
                continue
            if self._read_pending() == "skipped":
                continue  # the step just taken was not applied
            if state.step % t.eval_every == 0 or state.step == t.max_steps:
                self._evaluate()
            if (
                state.step % (t.checkpoint_every or t.eval_every) == 0
                or state.step == t.max_steps
                or self.patience_spent()
                or self.pruned
            ):
                self._checkpoint(wait=False)

    def patience_spent(self) -> bool:
        """``train.early_stop``: the val loss has not improved for ``patience`` evaluations."""
        rule = self.spec.train.early_stop
        return rule is not None and self.state.evals_since_best >= rule.patience

    def _count_patience(self, val: float) -> None:
        """An evaluation improves when it beats the best so far by more than ``min_delta``."""
        rule, state = self.spec.train.early_stop, self.state
        if rule is None:
            return
        improved = state.best_val is None or val < state.best_val - rule.min_delta
        state.evals_since_best = 0 if improved else state.evals_since_best + 1
        if self.stopped_early():
            best = val if state.best_val is None else min(state.best_val, val)
            self.progress.print(
                f"step {state.step}: early stop: val loss has not improved by more than "
                f"{rule.min_delta} for {rule.patience} evaluation(s) (best {best:.4f})"
            )

    def stopped_early(self) -> bool:
        """Patience ran out before ``max_steps`` (on the last step it stops no earlier)."""
        return self.patience_spent() and self.state.step < self.spec.train.max_steps

    def stop_reason(self, status: str) -> str:
        """Why the run ended: max_steps, early_stop, interrupted or failed."""
        if status == "KILLED":
            return "interrupted"
        if status != "FINISHED":
            return "failed"
        if self.pruned:
            return "pruned"
        return "early_stop" if self.stopped_early() else "max_steps"

    def _stop_if_asked(self) -> None:
        if self.dist.any(self._stop_signal is not None):  # every rank stops at the same step
            self._stop_signal = self._stop_signal or "a signal to another process"
            self._read_pending()  # the checkpoint counts every step taken
            path = self._checkpoint()
            raise Interrupted(
                f"stopped by {self._stop_signal} at step {self.state.step}; checkpoint {path}",
                f"Continue with: {self.resume_hint()}",
            )

    def resume_hint(self) -> str:
        """The command that continues this run exactly (its spec and overrides are its own)."""
        if self.dist.enabled:
            return (
                f"torchrun --nproc_per_node={self.dist.world} -m gptkit train --resume "
                f"--run-dir {self.run_dir}"
            )
        return f"gptkit train --resume --run-dir {self.run_dir}"

    def _train_step(self, lr: float) -> tuple[float, float] | torch.Tensor:
        """Forward/backward over ``grad_accum_steps`` micro-batches, clip, step. Returns the
        step's loss and gradient norm: read (floats), or, with ``defer_reads``, still on the
        device (the micro-batches' losses, then the norm) until ``_read_pending``."""
        values = self._gradients(lr)
        read: tuple[float, float] | torch.Tensor = values
        if self.defer_reads:
            self._step_on_device(values)
        else:
            read = self._step_on_host(values)
        self.optimizer.zero_grad(set_to_none=True)
        return read

    def _gradients(self, lr: float) -> torch.Tensor:
        """The step's gradients, clipped; returns its micro-batches' losses and the gradient
        norm, on the device."""
        t, d = self.spec.train, self.dist
        set_lr(self.optimizer, lr, t.lr)
        losses = []
        for micro in range(t.grad_accum_steps):
            x, y = get_batch(
                self.data.train,
                t.batch_size,
                self.spec.model.max_seq_len,
                self.data_gen,
                self.device,
                (d.rank, d.world),
            )
            # Under DDP, synchronise gradients only on the last micro-step.
            last = micro == t.grad_accum_steps - 1
            sync = nullcontext() if not d.enabled or last else self.forward.no_sync()
            with sync, self._autocast():
                loss = self.forward(x, y).loss / t.grad_accum_steps
            with sync:
                loss.backward()
            losses.append(loss.detach().float())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return torch.stack([*losses, norm.float().reshape(())])

    def _step_on_device(self, values: torch.Tensor) -> None:
        """The optimizer step, which the fused kernel skips itself if ``values`` are not all
        finite: nothing is read back."""
        self.optimizer.found_inf = (~values.isfinite().all()).float()  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]

    def _step_on_host(self, values: torch.Tensor) -> tuple[float, float]:
        """Read the loss (averaged over processes) and the norm, and step if both are finite.
        One copy to the host per step (the micro-batches' losses and the norm together): on a
        GPU each .item() waits for the work queued before it."""
        *micro_losses, grad_norm = values.tolist()
        loss = self.dist.mean(sum(micro_losses, 0.0))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        return loss, grad_norm

    def _read_due(self) -> bool:
        """Are the steps taken read now: every step, or, with ``defer_reads``, at a step that
        logs, evaluates or writes a checkpoint (and the last)?"""
        t, step = self.spec.train, self.state.step
        return (
            not self.defer_reads
            or step == t.max_steps
            or any(step % every == 0 for every in (t.log_every, t.eval_every))
            or step % (t.checkpoint_every or t.eval_every) == 0
        )

    def _read_pending(self) -> Literal["applied", "skipped", "nothing"]:
        """Count, report and log the steps taken since the last read (one copy from the device
        for all of them; each is given the window's mean time). Returns what became of the
        last one."""
        pending, self.pending = self.pending, []
        if not pending:
            return "nothing"
        seconds = (time.perf_counter() - self.window_start) / len(pending)
        values = [v for _, _, v in pending]
        if self.defer_reads:  # one process: the micro-batches' losses add up to the step's
            values = [(sum(row[:-1], 0.0), row[-1]) for row in torch.stack(values).tolist()]
        outcome: Literal["applied", "skipped"] = "applied"
        for (step, lr, _), (loss, grad_norm) in zip(pending, values):
            outcome = "skipped" if self._step_was_bad(step, loss, grad_norm) else "applied"
            if outcome == "applied":
                self.state.tokens_seen += self.tokens_per_step
                self._log(step, loss, lr, grad_norm, seconds)
        return outcome

    def _read_what_is_left(self) -> None:
        """After a failure (or Ctrl-C) between two reads: count the steps taken but not read
        yet, quietly - the failure is what the user has to see."""
        if self.pending:
            try:
                self._read_pending()
            except Exception:
                self.pending = []

    def _step_was_bad(self, step: int, loss: float, grad_norm: float) -> bool:
        """Count a non-finite step (it was not applied); stop after too many in a row."""
        state = self.state
        if math.isfinite(loss) and math.isfinite(grad_norm):
            state.bad_in_a_row = 0
            return False
        state.skipped += 1
        state.bad_in_a_row += 1
        self.progress.print(
            f"step {step}: non-finite loss or gradient ({loss}, {grad_norm}); step skipped"
        )
        if state.bad_in_a_row >= self.spec.train.max_bad_steps:
            # Read after later steps were taken: the run stops, as recorded, where the limit
            # was reached (nothing after it is written; its last checkpoint is older still).
            state.step = step
            raise TrainingError(
                f"training stopped at step {step}: {state.bad_in_a_row} non-finite steps "
                f"in a row; last good checkpoint: {self._latest_checkpoint()}",
                "Lower train.lr, set train.grad_clip, or check the data.",
            )
        return True

    def _latest_checkpoint(self) -> str:
        self._settle_checkpoint()  # a write in flight may be about to move the pointer
        last = read_pointer(self.rundir.checkpoints / "latest")
        return str(self.rundir.checkpoints / last) if last else "none yet"

    def _log(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        t = self.spec.train
        due = step % t.log_every == 0 or step == t.max_steps
        self.progress.step(step, loss, lr, self.tokens_per_step, seconds, plain_line=due)
        if due and self.record is not None:
            self.record.metrics(
                {
                    "step": step,
                    "train_loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_sec": self.tokens_per_step / max(seconds, 1e-9),
                }
            )

    def _evaluate(self) -> None:
        state, spec = self.state, self.spec
        with self._timed("evaluation"):
            state.last_val = evaluate(self.model, self.data.val, spec, self.device, self._autocast)
        self._count_patience(state.last_val)
        state.best_val = (
            state.last_val if state.best_val is None else min(state.best_val, state.last_val)
        )
        if self.record is not None:
            self.record.metrics(
                {
                    "step": state.step,
                    "val_loss": state.last_val,
                    "val_ppl": math.exp(min(state.last_val, 50)),
                }
            )
        self.progress.print(
            f"step {state.step}: val loss {state.last_val:.4f} (best {state.best_val:.4f})"
        )
        if self.on_eval is not None and state.step < spec.train.max_steps:
            self.pruned = bool(self.on_eval(state.step, state.last_val))
            if self.pruned:
                self.progress.print(f"step {state.step}: pruned by the search (not promising)")
        # A sharded model runs only with every rank taking part.
        if spec.train.sample_tokens and (self.dist.main or self.fsdp):
            with self._timed("samples"):
                self._sample()

    def _sample(self) -> None:
        """The in-run sample after an evaluation: printed and kept in the run folder."""
        spec, step = self.spec, self.state.step
        text = progress_sample(
            self.model,
            self.data.tokenizer,
            spec.sampler,
            spec.train.sample_tokens,
            spec.seed + step,
        )
        self.progress.print(f"  sample: {one_line(text)}")
        if self.dist.main:
            self.rundir.append_sample(step, text)

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Count the wall time of the block as ``phase`` (for the run's "done" line); a
        block inside another counted block is not counted twice."""
        if self._timing:
            yield
            return
        self._timing, start = True, time.perf_counter()
        try:
            yield
        finally:
            self._timing = False
            self.phase_seconds[phase] += time.perf_counter() - start

    def _checkpoint(self, wait: bool = True) -> Path | None:
        """Save weights + state atomically (rank 0 writes; every rank's RNG is kept). With
        ``wait=False`` the files are written in the background (``self.writer``) while
        training goes on; the path is then not returned."""
        with self._timed("checkpoints"):
            return self._save_checkpoint(wait)

    def _save_checkpoint(self, wait: bool) -> Path | None:
        state, d = self.state, self.dist
        state.torch_rng_per_rank = d.gather(torch.get_rng_state())  # each rank's dropout stream
        state.data_rng = self.data_gen.get_state()
        state.cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        state.train_seconds = self._train_seconds()
        weights, opt_state = self.model, None
        if self.fsdp:
            weights, opt_state = self._gather_full_state()
            # Written in line under FSDP: the gathers are the cost, and with the write beside
            # training a two-rank run aborted in gloo now and then (2 of ~16 under load).
            wait = True
        if not d.main:
            return None
        opt_state = opt_state if self.fsdp else self.optimizer.state_dict()
        meta = {
            "val_loss": state.last_val,
            "time": time.time(),
            "fingerprint": hashlib.sha256(
                json.dumps(fingerprint(self.spec), sort_keys=True).encode()
            ).hexdigest()[:16],
        }
        self.writer.submit(
            self.rundir.checkpoints,
            state.step,
            weights,
            state.to_checkpoint(opt_state, "full" if self.fsdp else "local"),
            meta,
            self.spec.train.keep_last,
            copied=self.fsdp,  # gathered to fresh host copies already
        )
        return self.writer.wait() if wait else None

    def _settle_checkpoint(self) -> None:
        """A checkpoint write still in flight when the loop ended by an error completes first;
        its own failure is only reported (the error that ended the loop is the one raised)."""
        try:
            with self._timed("checkpoints"):
                self.writer.wait()
        except Exception as exc:
            print(f"gptkit: warning: {exc}", file=sys.stderr)

    def _write_failed(self, exc: OSError, step: int) -> RunError:
        """A checkpoint write that failed (disk full, read-only, quota): what to say."""
        return RunError(
            f"could not write checkpoint {checkpoint_name(step)} in "
            f"{self.rundir.checkpoints}: {exc.strerror or exc}; the last good checkpoint "
            f"({read_pointer(self.rundir.checkpoints / 'latest') or 'none yet'}) is intact",
            "Free space or fix permissions, then continue with --resume.",
        )

    def _gather_full_state(self) -> tuple[torch.nn.Module, Any]:
        """Full (unsharded) weights and optimizer state on rank 0: one checkpoint format."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=full)
        opt_state = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        weights = self.model
        if self.dist.main:
            with torch.random.fork_rng(devices=[]):  # its random init is not training's stream
                weights = GPT(self.spec.model)
            weights.load_state_dict(model_state)
        return weights, opt_state

    # ------------------------------------------------------------------ the end

    def _train_seconds(self) -> float:
        """Wall time spent training, this session and the ones before it."""
        return self._session_base + (time.time() - self._started)

    def _announce(self) -> None:
        self._session_base = self.state.train_seconds
        d, n_params = self.dist, self.model.num_params(non_embedding=False)
        self.progress.print(
            f"run {self.run_dir} ({self.run_name}) | {n_params / 1e6:.2f}M parameters | device "
            f"{self.device.type}{' bf16' if self.bf16 else ''}"
            f"{f' x {d.world} processes' if d.enabled else ''} | "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens"
        )
        for key, old, new in self.changes:
            if not self.idle:  # nothing is trained, so nothing is changed
                self.progress.print(f"resume changes {key}: {old!r} -> {new!r}")

    def _finish(self, status: str) -> int:
        if not self.dist.main:
            return 0
        self._stop_reason = self.stop_reason(status)
        if self.idle and status == "FINISHED":
            try:
                return self.record.send_spooled() if self.record is not None else 0
            finally:
                self.rundir.unlock()
        try:
            summary = self.summary()
            self.rundir.update_info(status=status, stop_reason=self._stop_reason, summary=summary)
            return self.record.close(status, summary) if self.record is not None else 0
        finally:
            self.rundir.unlock()

    def summary(self) -> dict[str, Any]:
        """The run's headline figures, over all of its sessions."""
        state = self.state
        seconds = self._train_seconds()
        return {
            "steps": state.step,
            "best_val_loss": state.best_val,
            "final_val_loss": state.last_val,
            "total_tokens": state.tokens_seen,
            "wall_time_s": round(seconds, 3),
            "tokens_per_sec": state.tokens_seen / seconds if seconds > 0 else None,
            "skipped_steps": state.skipped,
            "stop_reason": getattr(self, "_stop_reason", None) or self.stop_reason("FINISHED"),
        }

    def _result(self, spooled: int) -> TrainResult:
        state = self.state
        elapsed = time.time() - self._started
        trained = state.step - self.first_step
        tokens = trained * self.tokens_per_step
        return TrainResult(
            self.run_dir,
            state.step,
            trained,
            state.last_val,
            state.best_val,
            elapsed,
            # Over the training, as run.json's summary: the record's closing is not in it.
            tokens / max(elapsed - self.phase_seconds["tracking"], 1e-9) if trained else 0.0,
            state.skipped,
            spooled,
            self.record.url if self.record is not None else None,
            self.stop_reason("FINISHED"),
            dict(self.phase_seconds),
            bool(self.spec.tracking.enabled),
        )
