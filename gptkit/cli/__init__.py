"""The ``gptkit`` command line: one module per command group, each command parses its
arguments, calls one library function and prints. Every error a user can cause ends in a
message and exit code 2, never a traceback."""

from __future__ import annotations

import sys

# Importing the command modules registers their commands on the app, in the order
# ``gptkit --help`` lists them: specs and plugins, training, using a model, moving one, speed.
# isort: off
from gptkit.cli import spec, train, generate, export, bench  # noqa: F401

# isort: on
from gptkit.cli._common import app, echo
from gptkit.errors import GptkitError, QuietExit


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print a message and exit 2, never a traceback.

    Usage errors (bad flags) are handled by the CLI library itself, which also exits 2.
    """
    try:
        check_tempdir()
        app(args=argv, prog_name="gptkit", standalone_mode=True)
    except GptkitError as exc:
        echo(f"gptkit: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SystemExit as exc:  # the CLI library's exit 130 for a bare Ctrl-C is silent
        if exc.code == 130 and not isinstance(exc, QuietExit):
            echo("gptkit: interrupted", err=True)
        raise


def check_tempdir() -> None:
    """Refuse to start (exit 2) when no folder can hold a temporary file — a full disk, say:
    torch, MLflow and the exporters all need one, and would otherwise fail deep inside an
    import with a traceback. A ``TMPDIR`` that is unusable while another folder works only
    earns a warning (Python falls back to /tmp on its own)."""
    import os
    import tempfile

    try:
        used = tempfile.gettempdir()
    except OSError as exc:  # FileNotFoundError: "No usable temporary directory found in [...]"
        raise GptkitError(
            f"no usable temporary folder: {exc.strerror or exc} (is the disk full?)",
            "Free some space, or point TMPDIR at a writable folder with room.",
        ) from None
    wanted = os.environ.get("TMPDIR")
    if wanted and os.path.realpath(wanted) != os.path.realpath(used):
        echo(
            f"gptkit: warning: TMPDIR={wanted} is not usable; temporary files go to {used}",
            err=True,
        )
