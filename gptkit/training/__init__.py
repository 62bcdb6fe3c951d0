"""Training: the loop, its state, the run folder, checkpoints, tracking, sweeps.

- ``RunDir`` (gptkit.store.rundir): the one owner of a run folder's layout; finds and opens runs.
- ``TrainState`` (state.py): everything a resume needs besides the weights.
- ``SpecTrainer`` (loop.py): set up → step → log → evaluate → checkpoint, until max_steps.
- distributed.py (torchrun), tracking.py (MLflow that never
  stops training), record.py (what the run's MLflow record says), progress.py (the bar),
  sweep.py (grids), compare.py (runs side by side), listing.py (``gptkit runs``).
"""

from typing import Any

from gptkit.store.rundir import LoadedRun, RunDir, load_run

__all__ = ["LoadedRun", "RunDir", "TrainState", "SpecTrainer", "TrainResult", "load_run"]


def __getattr__(name: str) -> Any:
    # The torch-using parts load on first use: finding and listing runs stays torch-free.
    if name == "TrainState":
        from gptkit.training.state import TrainState

        return TrainState
    if name in ("SpecTrainer", "TrainResult"):
        from gptkit.training import loop

        return getattr(loop, name)
    raise AttributeError(name)
