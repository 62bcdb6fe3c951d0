"""Training: the loop, its state, resume, tracking, sweeps.

- ``SpecTrainer`` (loop.py): set up → step → log → evaluate → checkpoint, until max_steps.
- device.py: which device a spec trains on, bf16 autocast, TF32; shared with ``gptkit bench``.
- ``TrainState`` (state.py): everything a resume needs besides the weights.
- resume.py (which run ``--resume`` continues, with which spec), plan.py (what a spec would
  train: ``gptkit validate``), distributed.py (torchrun), tracking.py (MLflow that never
  stops training), record.py (what the run's MLflow record says), progress.py (the bar),
  sweep.py (grids), compare.py (runs side by side), stats.py, listing.py (``gptkit runs``).
- Run folders (``RunDir``, ``load_run``) live in ``gptkit.store.rundir``.
"""

from typing import Any

__all__ = ["TrainState", "SpecTrainer", "TrainResult"]


def __getattr__(name: str) -> Any:
    # The torch-using parts load on first use: finding and listing runs stays torch-free.
    if name == "TrainState":
        from gptkit.training.state import TrainState

        return TrainState
    if name in ("SpecTrainer", "TrainResult"):
        from gptkit.training import loop

        return getattr(loop, name)
    raise AttributeError(name)
