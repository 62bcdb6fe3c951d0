"""Training: the loop, its state, the run folder, checkpoints, tracking, sweeps.

- ``RunDir`` (rundir.py): the one owner of a run folder's layout; finds and opens runs.
- ``TrainState`` (state.py): everything a resume needs besides the weights.
- ``Trainer`` (loop.py): set up → step → log → evaluate → checkpoint, until max_steps.
- checkpoint.py (atomic files), distributed.py (torchrun), tracking.py (MLflow that never
  stops training), record.py (what the run's MLflow record says), progress.py (the bar),
  sweep.py (grids), compare.py (runs side by side), listing.py (``gptkit runs``).
"""

from typing import Any

from gptkit.training.rundir import LoadedRun, RunDir, load_run

__all__ = ["LoadedRun", "RunDir", "TrainState", "Trainer", "TrainResult", "load_run"]


def __getattr__(name: str) -> Any:
    # The torch-using parts load on first use: finding and listing runs stays torch-free.
    if name == "TrainState":
        from gptkit.training.state import TrainState

        return TrainState
    if name in ("Trainer", "TrainResult"):
        from gptkit.training import loop

        return getattr(loop, name)
    raise AttributeError(name)
