"""A run to an ONNX bundle: ``onnx`` (the graph with its KV cache), ``parity`` (the gate
against torch), ``quantize`` (int8 and its quality report), ``bundle`` (``export_run``:
staging, manifest, atomic swap) and ``mlflow`` (the bundle in the run's record)."""
