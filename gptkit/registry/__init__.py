"""The plugin layer: ``hookspecs`` (one hook per slot, what a plugin implements),
``manager`` (the pluggy manager: built-ins, entry points, ``plugins:`` modules, trust and
provenance) and ``registry`` (slot -> kind -> spec class, ``load_registry``).

Importing ``gptkit.registry.hookspecs`` (what components do) loads nothing else."""
