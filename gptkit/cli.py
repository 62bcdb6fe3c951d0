"""The ``gptkit`` command line. Every error a user can cause ends in a message and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from gptkit.errors import GptkitError

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


def echo(text: str = "", err: bool = False) -> None:
    typer.echo(text, err=err)


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


# --------------------------------------------------------------------------- plugins, schema


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List every plugin (name, version, origin) and the components it registers, by slot."""
    from gptkit.registry import SLOTS, load_registry

    registry = load_registry()
    if as_json:
        doc = {
            "plugins": [vars(i) for i in registry.pm.infos],
            "components": {
                slot: {
                    k: {"provider": r.provider, "version": r.version, "class": r.cls.__name__}
                    for k, r in sorted(registry.components[slot].items())
                }
                for slot in SLOTS
            },
            "problems": registry.problems,
        }
        echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "version", "origin", "status"):
        table.add_column(col)
    for info in registry.pm.infos:
        table.add_row(info.name, info.version, info.origin, info.error or "ok")
    console.print(table)
    table = Table(title="components", title_justify="left")
    for col in ("slot", "kind", "spec class", "provider"):
        table.add_column(col)
    for slot in SLOTS:
        for kind, reg in sorted(registry.components[slot].items()):
            table.add_row(slot, kind, reg.cls.__name__, f"{reg.provider} {reg.version}")
    console.print(table)
    warn_plugin_problems(registry)


@app.command()
def schema(
    plugin: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--plugin", "-p", help="Also load this plugin module (repeatable)."),
    ] = None,
) -> None:
    """Print the JSON Schema of the experiment spec, after plugins load (for editors)."""
    from gptkit.registry import load_registry
    from gptkit.spec import spec_class

    registry = load_registry(tuple(plugin or ()))
    warn_plugin_problems(registry)
    echo(json.dumps(spec_class(registry).model_json_schema(), indent=2))


# --------------------------------------------------------------------------- validate


@app.command()
def validate(
    spec: SpecArg,
    overrides: SetOpt = None,
    print_spec: Annotated[
        bool, typer.Option("--print-spec", help="Print the resolved spec as YAML.")
    ] = False,
) -> None:
    """Check a spec and print the resolved model (parameters, components) without training."""
    from gptkit.spec import load_spec

    resolved = load_spec(spec, overrides or [])
    from gptkit.registry import load_registry

    registry = load_registry(tuple(resolved.plugins))
    warn_plugin_problems(registry)
    if print_spec:
        import yaml

        echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False).rstrip())
        return
    m = resolved.model
    echo(f"{spec}: valid")
    echo(f"  name        {resolved.name}")
    for slot, component in (
        ("tokenizer", resolved.tokenizer),
        ("attention", m.attention),
        ("positional", m.positional),
        ("sampler", resolved.sampler),
        ("optimizer", resolved.train.optimizer),
    ):
        reg = registry.components[slot][component.kind]
        fields = component.model_dump(exclude={"kind"}, exclude_defaults=slot == "sampler")
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        echo(f"  {slot:<11} {component.kind} {extra}  [{reg.provider}]".rstrip())
    echo(
        f"  model       {m.n_layers} layers, {m.n_heads} heads, d_model {m.d_model}, "
        f"d_ff {m.hidden_dim}, max_seq_len {m.max_seq_len}, dropout {m.dropout}, "
        f"{m.norm}, {m.activation}"
    )
    vocab = m.vocab_size
    if vocab is None:
        vocab = _vocab_size_from_tokenizer(resolved)
    try:
        import torch

        from gptkit.model import build_model
    except ImportError:
        echo("  parameters  (install gptkit[train] to count them)")
        return
    with torch.device("meta"):  # count without allocating
        model = build_model(resolved, vocab_size=vocab)
    total = model.num_params(non_embedding=False)
    echo(f"  vocab_size  {vocab}")
    echo(f"  parameters  {total / 1e6:.2f}M ({total:,})")


def _vocab_size_from_tokenizer(spec) -> int:
    tokenizer = spec.tokenizer.build()
    from gptkit.data import load_text, split_text

    train_text, _ = split_text(load_text(spec.data.source), spec.data.val_fraction)
    tokenizer.fit(train_text)
    return tokenizer.vocab_size


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print a message and exit 2, never a traceback."""
    try:
        code = app(args=argv, prog_name="gptkit", standalone_mode=False)
    except GptkitError as exc:
        echo(f"gptkit: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        echo("gptkit: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
