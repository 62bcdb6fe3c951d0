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
from gptkit.errors import GptkitError


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print a message and exit 2, never a traceback.

    Usage errors (bad flags) are handled by the CLI library itself, which also exits 2.
    """
    try:
        app(args=argv, prog_name="gptkit", standalone_mode=True)
    except GptkitError as exc:
        echo(f"gptkit: error: {exc}", err=True)
        sys.exit(exc.exit_code)
