"""The trainer: batches of random windows, AdamW, warmup + decay, evaluation, checkpoints,
exact resume, MLflow tracking.

Everything random is drawn from state that the checkpoint stores (the torch RNG for dropout, a
dedicated generator for batch positions), so a run killed at any moment and resumed ends with
the same weights, bit for bit on CPU, as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    read_pointer,
    resume_candidates,
    save_checkpoint,
)
from gptkit.data import TokenData, prepare_data
from gptkit.errors import GptkitError, RunError
from gptkit.model import GPT
from gptkit.run import SPEC_FILE, dump_yaml, latest_run_dir, new_run_dir, read_jsonl, read_run_spec
from gptkit.spec import ExperimentSpec

EVAL_SEED_OFFSET = 1_000_003


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            # gloo on CPU, NCCL on GPU: PyTorch's own engine, set up by torchrun's env vars.
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        torch.distributed.all_reduce(t)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


class TrainingError(GptkitError):
    """Training could not go on (e.g. the loss kept diverging)."""

    exit_code = 1


class Interrupted(GptkitError):
    """Stopped by Ctrl-C / SIGTERM after writing a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    tokens_per_sec: float
    skipped_steps: int
    spooled_events: int


def lr_at(step: int, train) -> float:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GptkitError("train.device is 'cuda' but no CUDA device is available",
                          "Use train.device=auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptkitError("train.device is 'mps' but MPS is not available", "Use auto or cpu.")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise GptkitError(f"train.precision is bf16 but {device.type} has no bf16 autocast here",
                          "Use train.precision=auto or fp32.")
    return supported


def get_batch(data: np.ndarray, batch_size: int, block: int, gen: torch.Generator,
              device: torch.device, part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block`` tokens and their next-token targets.

    With ``part=(rank, world)`` every rank draws the same global batch and keeps its slice,
    so N processes see exactly the batch one process would.
    """
    starts = torch.randint(len(data) - block, (batch_size,), generator=gen).numpy()
    rank, world = part
    share = batch_size // world
    starts = starts[rank * share : (rank + 1) * share]
    windows = np.asarray(data[starts[:, None] + np.arange(block + 1)], dtype=np.int64)
    xy = torch.from_numpy(windows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, spec: ExperimentSpec, device, autocast) -> float:
    """Mean loss over ``eval_batches`` fixed batches (the same ones at every evaluation)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(spec.seed + EVAL_SEED_OFFSET)
    losses = []
    for _ in range(spec.train.eval_batches):
        x, y = get_batch(data, spec.train.batch_size, spec.model.max_seq_len, gen, device)
        with autocast():
            losses.append(model(x, y).loss.item())
    model.train(was_training)
    return float(np.mean(losses))


def fingerprint(spec: ExperimentSpec) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model and the tokenizer."""
    return {"model": spec.model.model_dump(mode="json"),
            "tokenizer": spec.tokenizer.model_dump(mode="json")}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} in the checkpoint, {b!r} now"]


class Progress:
    """A live bar on a terminal; plain lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.live = total, enabled and sys.stderr.isatty()
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str, show: bool) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif show:
            print(f"step {step:>6}/{self.total} | {info}", flush=True)

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    """Train an ``ExperimentSpec`` in a run directory (new, or resumed)."""

    def __init__(
        self,
        spec: ExperimentSpec,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        model: GPT | None = None,
    ) -> None:
        self.spec = spec
        self.initial_model = model  # train this instance instead of a fresh one
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.resume = resume
        self.show_progress = progress
        self.on_event = on_event or (lambda kind, data: None)
        self.dist = Dist()
        if self.dist.world > 1 and spec.train.batch_size % self.dist.world:
            raise GptkitError(
                f"train.batch_size ({spec.train.batch_size}) must be divisible by the number of "
                f"processes ({self.dist.world}): it is the global batch, split across them")
        # Rank 0 picks the folder (a new one is named by the clock) and tells the others.
        chosen = self._choose_run_dir(Path(run_dir) if run_dir else None) if self.dist.main else None
        self.run_dir = Path(self.dist.broadcast(str(chosen) if chosen else None) or ".")
        self._stop_signal: str | None = None

    def _choose_run_dir(self, run_dir: Path | None) -> Path:
        if self.resume:
            run_dir = run_dir or latest_run_dir(self.spec.name)
            if run_dir is None or not (run_dir / SPEC_FILE).is_file():
                raise RunError(
                    f"nothing to resume: no run of '{self.spec.name}' "
                    f"{'in ' + str(run_dir) if run_dir else 'under runs/' + self.spec.name}",
                    "Start it without --resume.",
                )
            return run_dir
        if run_dir is None:
            return new_run_dir(self.spec.name)
        if list_checkpoints(run_dir / "checkpoints"):
            raise RunError(f"{run_dir} already holds checkpoints",
                           "Add --resume to continue it, or choose another --run-dir.")
        return run_dir

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        spec = self.spec
        torch.manual_seed(spec.seed)
        if spec.train.threads:
            torch.set_num_threads(spec.train.threads)
        self.device = pick_device(spec.train.device)
        self.bf16 = use_bf16(spec.train.precision, self.device)
        block = spec.model.max_seq_len
        if not self.dist.main:
            self.dist.barrier()  # rank 0 fills the token cache first
        self.data: TokenData = prepare_data(spec.data, spec.tokenizer, min_len=block + 1)
        if self.dist.main:
            self.dist.barrier()
        tok = self.data.tokenizer
        vocab = spec.model.vocab_size or tok.vocab_size
        if vocab < tok.vocab_size:
            raise GptkitError(
                f"model.vocab_size is {vocab} but the tokenizer has {tok.vocab_size} tokens",
                "Leave model.vocab_size unset to take the tokenizer's.",
            )
        self.spec = spec = spec.model_copy(
            update={"model": spec.model.model_copy(update={"vocab_size": vocab})}
        )
        if not self.dist.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            old = read_run_spec(self.run_dir)
            diffs = _diff(fingerprint(old), fingerprint(spec))
            if diffs:
                raise RunError(
                    f"cannot resume {self.run_dir}: the spec's model or tokenizer differ from "
                    "the checkpoint's: " + "; ".join(diffs[:6]),
                    "Only fields outside model: and tokenizer: (such as train.max_steps) may "
                    "change on resume; start a new run for a different model.",
                )
        dump_yaml(spec.to_dict(), self.run_dir / SPEC_FILE)
        tok.save(self.run_dir / "tokenizer")

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _install_signals(self):
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                pass
        return previous

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        from gptkit.generate import sample_text
        from gptkit.tracking import Tracker, flatten, resolve_uri

        self._prepare()
        spec, t = self.spec, self.spec.train
        if self.initial_model is not None:
            if self.initial_model.spec.model_dump(exclude={"vocab_size"}) != \
                    spec.model.model_dump(exclude={"vocab_size"}):
                raise GptkitError("the model passed in does not match the spec's model: build it from that spec")
            model = self.initial_model.to(self.device)
        else:
            model = GPT(spec.model).to(self.device)
        gen = torch.Generator().manual_seed(spec.seed)
        step, best_val, bad_in_a_row, skipped, tokens_seen = 0, None, 0, 0, 0
        last_val: float | None = None
        ckpt_dir = self.run_dir / "checkpoints"
        d = self.dist
        fsdp = d.enabled and t.parallel == "fsdp"
        state = ckpt = None
        if self.resume:  # weights go into the whole model, before any sharding
            state, ckpt = self._load_latest(model, ckpt_dir)
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            # FSDP2: each block's parameters are split across processes and gathered only
            # while that block runs; the root wraps what is left (embeddings, final norm).
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        optimizer = t.optimizer.build(model, lr=t.lr)
        if state is not None:
            if state.get("optimizer") is not None:  # (an imported model has none yet)
                if fsdp != (state.get("optimizer_format") == "full"):
                    raise RunError("this checkpoint's optimizer state was saved with "
                                   f"train.parallel={'fsdp' if not fsdp else 'ddp or one process'}; "
                                   "resume it the same way")
                if fsdp:
                    from torch.distributed.checkpoint.state_dict import (
                        StateDictOptions,
                        set_optimizer_state_dict,
                    )

                    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                             options=StateDictOptions(full_state_dict=True))
                else:
                    optimizer.load_state_dict(state["optimizer"])
            rngs = state.get("torch_rng_per_rank") or [state.get("torch_rng")]
            if rngs[min(d.rank, len(rngs) - 1)] is not None:
                torch.set_rng_state(rngs[min(d.rank, len(rngs) - 1)])
            if "data_rng" in state:
                gen.set_state(state["data_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng"):
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            step, best_val = int(state["step"]), state.get("best_val_loss")
            skipped, tokens_seen = int(state.get("skipped_steps", 0)), int(state.get("tokens_seen", 0))
            last_val = state.get("val_loss")
            if d.main:
                self._truncate_metrics(step)
                print(f"resuming {self.run_dir} from {ckpt.name} (step {step})", flush=True)

        forward = torch.compile(model) if t.compile else model
        if d.enabled and not fsdp:
            from torch.nn.parallel import DistributedDataParallel

            # Gradients are averaged across processes in backward: one optimizer step over the
            # global batch, the same on every rank.
            forward = DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        tracker = None
        if spec.tracking.enabled and d.main:
            tracker = Tracker(resolve_uri(spec.tracking.uri), spec.tracking.experiment or spec.name,
                              self.run_dir, self.run_name or self.run_dir.name,
                              warn=lambda m: print(f"gptkit: warning: {m}", file=sys.stderr, flush=True),
                              parent_run_id=self.parent_run_id)
            if self.resume and tracker.run_id:
                tracker.reopen()
                tracker.set_tags({f"gptkit.resumed_at.{step}": time.strftime("%Y-%m-%dT%H:%M:%S")})
            else:
                from gptkit.registry import load_registry

                registry = load_registry(tuple(spec.plugins))
                params = flatten(spec.to_dict())
                params.update({f"plugin.{i.name}": i.version for i in registry.pm.infos
                               if i.origin != "builtin" and not i.error})
                params["n_params"] = str(model.num_params(non_embedding=False))
                tracker.log_params(params)

        def checkpoint(val_loss):
            rngs = d.gather(torch.get_rng_state())  # each rank's dropout stream
            weights, opt_state = model, None
            if fsdp:  # gather full (unsharded) states on rank 0: one checkpoint format for all
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    get_model_state_dict,
                    get_optimizer_state_dict,
                )

                full = StateDictOptions(full_state_dict=True, cpu_offload=True)
                model_state = get_model_state_dict(model, options=full)
                opt_state = get_optimizer_state_dict(model, optimizer, options=full)
                if d.main:
                    weights = GPT(spec.model)
                    weights.load_state_dict(model_state)
            if not d.main:
                return None
            state = {
                "torch_rng_per_rank": rngs,
                "optimizer_format": "full" if fsdp else "local",
                "step": step, "optimizer": opt_state if fsdp else optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "best_val_loss": best_val, "val_loss": val_loss, "skipped_steps": skipped,
                "tokens_seen": tokens_seen,
            }
            meta = {"val_loss": val_loss, "time": time.time(),
                    "fingerprint": hashlib.sha256(json.dumps(fingerprint(spec), sort_keys=True)
                                                  .encode()).hexdigest()[:16]}
            try:
                return save_checkpoint(ckpt_dir, step, weights, state, meta, t.keep_last)
            except OSError as exc:  # disk full, read-only, quota: say so, keep what exists
                last = read_pointer(ckpt_dir / "latest")
                raise RunError(
                    f"could not write checkpoint {checkpoint_name(step)} in {ckpt_dir}: "
                    f"{exc.strerror or exc}; the last good checkpoint "
                    f"({last or 'none yet'}) is intact",
                    "Free space or fix permissions, then continue with --resume.",
                ) from None

        block, tokens_per_step = spec.model.max_seq_len, t.batch_size * spec.model.max_seq_len * t.grad_accum_steps
        ckpt_every = t.checkpoint_every or t.eval_every
        progress = Progress(t.max_steps, step, self.show_progress and d.main)
        if not d.main:
            progress.print = lambda text: None  # one voice: rank 0's
        previous_handlers = self._install_signals()
        started = time.time()
        window_t, window_tokens = time.perf_counter(), 0
        n_params = model.num_params(non_embedding=False)
        progress.print(f"run {self.run_dir} | {n_params / 1e6:.2f}M parameters | device "
                       f"{self.device.type}{' bf16' if self.bf16 else ''}"
                       f"{f' x {d.world} processes' if d.enabled else ''} | "
                       f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens")
        status = "FAILED"
        try:
            model.train()
            while step < t.max_steps:
                if d.any(self._stop_signal is not None):  # every rank stops at the same step
                    self._stop_signal = self._stop_signal or "a signal to another process"
                    path = checkpoint(last_val)
                    status = "KILLED"
                    raise Interrupted(
                        f"stopped by {self._stop_signal} at step {step}; checkpoint {path}",
                        f"Continue with: gptkit train SPEC --resume --run-dir {self.run_dir}",
                    )
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(t.grad_accum_steps):
                    x, y = get_batch(self.data.train, t.batch_size, block, gen, self.device,
                                     (d.rank, d.world))
                    # Under DDP, synchronise gradients only on the last micro-step.
                    sync = nullcontext() if not d.enabled or micro == t.grad_accum_steps - 1 \
                        else forward.no_sync()
                    with sync, self._autocast():
                        loss = forward(x, y).loss / t.grad_accum_steps
                    with sync:
                        loss.backward()
                    loss_sum += loss.item()
                loss_sum = d.mean(loss_sum)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    bad_in_a_row += 1
                    progress.print(f"step {step}: non-finite loss or gradient ({loss_sum}, "
                                   f"{grad_norm}); step skipped")
                    if bad_in_a_row >= t.max_bad_steps:
                        last = read_pointer(ckpt_dir / "latest")
                        raise TrainingError(
                            f"training stopped at step {step}: {bad_in_a_row} non-finite steps "
                            f"in a row; last good checkpoint: "
                            f"{ckpt_dir / last if last else 'none yet'}",
                            "Lower train.lr, set train.grad_clip, or check the data.",
                        )
                    step += 1
                    continue
                bad_in_a_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step

                if d.main and (step % t.log_every == 0 or step == t.max_steps):
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    row = {"step": step, "train_loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_sec": tps}
                    self._log_metrics(row, tracker)
                    eta = (t.max_steps - step) * tokens_per_step / max(tps, 1e-9)
                    progress.update(step, f"loss {loss_sum:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s "
                                    f"| eta {_eta(eta)}", show=True)
                else:
                    progress.update(step, "", show=False)

                if step % t.eval_every == 0 or step == t.max_steps:
                    last_val = evaluate(model, self.data.val, spec, self.device, self._autocast)
                    best_val = last_val if best_val is None else min(best_val, last_val)
                    if d.main:
                        self._log_metrics({"step": step, "val_loss": last_val,
                                           "val_ppl": math.exp(min(last_val, 50))}, tracker)
                    progress.print(f"step {step}: val loss {last_val:.4f} (best {best_val:.4f})")
                    # A sharded model runs only with every rank taking part.
                    if t.sample_tokens and (d.main or fsdp):
                        text = sample_text(model, self.data.tokenizer, spec.sampler,
                                           t.sample_tokens, seed=spec.seed + step)
                        progress.print(f"--- sample at step {step} ---\n{text}\n---")
                        if d.main:
                            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                                f.write(f"--- step {step} ---\n{text}\n")
                    self.on_event("eval", {"step": step, "val_loss": last_val})
                if step % ckpt_every == 0 or step == t.max_steps:
                    checkpoint(last_val)
                    self.on_event("checkpoint", {"step": step})
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise Interrupted(f"interrupted at step {step} (no checkpoint written for it)",
                              f"Resume from the last checkpoint: gptkit train SPEC --resume "
                              f"--run-dir {self.run_dir}") from None
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            progress.close()
            spooled = 0
            if tracker is not None:
                if status == "FINISHED":
                    self._final_artifacts(tracker)
                spooled = tracker.close(status)
                if spooled:
                    print(f"gptkit: warning: {spooled} MLflow events could not be sent; they are "
                          f"kept in {self.run_dir / 'mlflow-spool.jsonl'} and sent on --resume",
                          file=sys.stderr)
        elapsed = time.time() - started
        return TrainResult(self.run_dir, step, last_val, best_val, elapsed,
                           tokens_seen / max(elapsed, 1e-9), skipped, spooled)

    # ------------------------------------------------------------------ helpers

    def _load_latest(self, model, ckpt_dir: Path):
        errors = []
        for path in resume_candidates(ckpt_dir):
            try:
                state, _ = load_checkpoint(path, model)
                return state, path
            except RunError as exc:
                errors.append(str(exc))
                print(f"gptkit: warning: skipping unusable checkpoint: {exc}", file=sys.stderr)
        raise RunError(f"cannot resume {self.run_dir}: no usable checkpoint"
                       + (": " + "; ".join(errors) if errors else " (none written yet)"),
                       "Start a new run without --resume.")

    def _log_metrics(self, row: dict[str, Any], tracker) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the checkpoint: the resumed run writes them again."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [r for r in read_jsonl(path) if r.get("step", step + 1) <= step]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _final_artifacts(self, tracker) -> None:
        plot = self.run_dir / "loss_curve.png"
        try:
            plot_losses(self.run_dir / "metrics.jsonl", plot, self.spec.name)
        except Exception as exc:  # a plot is never worth failing a run over
            print(f"gptkit: warning: no loss plot: {exc}", file=sys.stderr)
        for name in (SPEC_FILE, "metrics.jsonl", "samples.txt", "loss_curve.png"):
            if (self.run_dir / name).exists():
                tracker.log_artifact(self.run_dir / name)
        tracker.log_artifact(self.run_dir / "tokenizer", "tokenizer")


def plot_losses(metrics: Path, out: Path, title: str) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
