"""Checkpoints written off the training loop's critical path.

``CheckpointWriter.submit`` copies what a checkpoint holds to host memory (the weights into a
CPU copy of the model kept for the purpose, every tensor of the training state) and hands the
copy to a background thread, which writes it with ``save_checkpoint``: the same atomic write,
the same ``latest``/``best`` moves, the same pruning. Training goes on changing its own tensors
meanwhile. One write is in flight at a time: the next ``submit`` waits for the previous one.

A write that fails is not lost: its error is raised by the next ``check`` (the loop calls it
every step), ``submit`` or ``wait``, and the last good checkpoint is intact, as with a write in
line. On a GPU the copy is one device-to-host transfer per tensor; serialising and fsyncing
(~0.15 s for the baby GPT's 130 MB of weights and optimizer state) happen beside training. The
cost is host memory: one copy of the weights (kept) and of the optimizer state (per write).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptkit.store.checkpoint import save_checkpoint


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (dicts, lists and tuples rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(host_copy(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """One background checkpoint write at a time; its failure surfaces on the next call.

    ``on_error(exc, step)`` turns a write's ``OSError`` into the error the caller raises (the
    message that names the checkpoint and the last good one); other errors are raised as
    they are. ``make_shadow(model)`` builds the host copy of the weights the first time (a new
    module on the CPU; by default a deep copy, which for a model on a GPU is made there first:
    pass a factory that builds it on the CPU)."""

    def __init__(
        self,
        on_error: Callable[[OSError, int], Exception],
        make_shadow: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        self.on_error = on_error
        self.make_shadow = make_shadow
        self._thread: threading.Thread | None = None
        self._shadow: torch.nn.Module | None = None  # host copy of the weights, reused
        self._error: BaseException | None = None
        self._path: Path | None = None

    def submit(
        self,
        ckpt_dir: Path,
        step: int,
        model: torch.nn.Module,
        state: dict[str, Any],
        meta: dict[str, Any],
        keep_last: int,
        copied: bool = False,
    ) -> None:
        """Copy the checkpoint to host memory now; write it in the background. ``copied``:
        ``model`` and ``state`` are already host copies no one else changes (FSDP's gathered
        full state), written as they are."""
        self.wait()
        self._path = None
        if not copied:
            model, state = self._snapshot(model), host_copy(state)
        save = functools.partial(
            save_checkpoint, ckpt_dir, step, model, state, dict(meta), keep_last
        )
        # Not a daemon: an interpreter that exits mid-write waits for the checkpoint.
        self._thread = threading.Thread(
            target=self._write, args=(save, step), name="gptkit-checkpoint", daemon=False
        )
        self._thread.start()

    def _snapshot(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            if self._shadow is None:
                if self.make_shadow is not None:
                    # Building a module initialises weights: not from training's random stream.
                    with torch.random.fork_rng(devices=[]):
                        shadow = self.make_shadow(model).to("cpu")
                else:
                    shadow = copy.deepcopy(model).to("cpu")
                    for p in shadow.parameters():
                        p.grad = None
                self._shadow = shadow.requires_grad_(False)
            self._shadow.load_state_dict(model.state_dict())
        return self._shadow

    def _write(self, save: Callable[[], Path], step: int) -> None:
        try:
            self._path = save()
        except OSError as exc:
            try:
                self._error = self.on_error(exc, step)
            except BaseException:  # the message could not be made: the error itself, then
                self._error = exc
        except BaseException as exc:  # a bug, not the disk: raised as it is
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise a finished write's error (never waits)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> Path | None:
        """Wait for the write in flight; its checkpoint's path, or its error raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._path
