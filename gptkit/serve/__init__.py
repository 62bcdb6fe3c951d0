"""The OpenAI-compatible HTTP server: ``schemas`` (wire format, limits, errors),
``scheduler`` (one decoding thread, continuous batching), ``service`` (check, admit, hand
over, answer), ``render`` (completion and chat objects, SSE), ``app`` (routes only) and
``http`` (the port and uvicorn)."""
