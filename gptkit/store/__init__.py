"""What gptkit keeps on disk: ``rundir`` (a run folder's layout, finding and opening runs),
``checkpoint`` (atomic checkpoints and the ``latest`` pointer) and ``bundle`` (an export
bundle's manifest and its integrity checks; torch-free)."""
