"""The typed experiment spec: ``models`` (``ExperimentSpec`` and its sections), ``validate``
(``validate_spec``, ``--set`` overrides, errors with dotted paths), ``files`` (YAML/TOML,
``extends:``, ``load_spec``) and ``reference`` (the generated field reference)."""
