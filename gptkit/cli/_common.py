"""What every command shares: the typer app, argument types, printing, and the checks that turn a
missing extra into a clear error."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.errors import GptkitError
from gptkit.safeio import escape_controls

app = typer.Typer(
    name="gptkit",
    help="Build, train, compare and ship small GPT-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


SpecArg = Annotated[Path, typer.Argument(help="Experiment spec file (.yaml, .yml or .toml).")]


SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", "-s", help="Override a field: --set model.dropout=0.1 (repeatable)."),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


STARTED = time.time()  # the command's start: a run's MLflow start time is this


@app.callback()
def _options(
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer needs Optional here
        typer.Option(
            "--plugin",
            help="Trust and load this plugin module, even when a run or "
            "bundle names it (repeatable; like GPTKIT_PLUGINS).",
        ),
    ] = None,
) -> None:
    """Build, train, compare and ship small GPT-style language models."""
    if plugin:
        from gptkit.registry.manager import allow_plugin_modules

        allow_plugin_modules(plugin)
        # Loaded like GPTKIT_PLUGINS, so every command (and its subprocesses) sees them.
        current = [m for m in os.environ.get("GPTKIT_PLUGINS", "").split(",") if m.strip()]
        os.environ["GPTKIT_PLUGINS"] = ",".join(dict.fromkeys([*current, *plugin]))


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    typer.echo(text, err=err, nl=nl)


def require_torch(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise GptkitError(
            f"'gptkit {command}' needs PyTorch, which is not installed",
            "Install the training extra: pip install 'gptkit[train]'.",
        )


def warn_plugin_problems(registry) -> None:
    for problem in registry.problems:
        echo(f"gptkit: warning: {problem}", err=True)


def print_table(grid: list[list[str]]) -> None:
    """A table of plain text: cells are neither markup (``[red]`` stays as written) nor
    terminal control sequences (see :func:`gptkit.safeio.escape_controls`)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table()
    for col in grid[0]:
        t.add_column(Text(escape_controls(str(col))))
    for row in grid[1:]:
        t.add_row(*(Text(escape_controls(str(cell))) for cell in row))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
