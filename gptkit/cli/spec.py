"""Commands about specs and plugins: ``plugins``, ``schema``, ``validate``, ``prepare``."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from gptkit.cli._common import JsonOpt, SetOpt, SpecArg, app, echo, warn_plugin_problems


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List every plugin (name, version, origin) and the components it registers, by slot."""
    import importlib.util

    from gptkit.registry.manager import plugin_manager
    from gptkit.registry.registry import SLOTS, Registry, load_registry

    if importlib.util.find_spec("torch") is None:
        # Without PyTorch, list the torch-free slots (what bundles use) and say what is missing.
        registry = Registry.from_manager(plugin_manager(torch_optional=True))
    else:
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
        refused = [p for p in registry.problems if f"plugin '{info.name}' " in p]
        status = info.error or ("error: " + "; ".join(refused) if refused else "ok")
        table.add_row(info.name, info.version, info.origin, status)
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
    markdown: Annotated[
        bool, typer.Option("--markdown", help="A readable reference of every field instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of the experiment spec, after plugins load (for editors)."""
    from gptkit.registry.registry import load_registry
    from gptkit.spec.models import spec_class

    registry = load_registry(tuple(plugin or ()))
    warn_plugin_problems(registry)
    if markdown:
        from gptkit.spec.reference import spec_reference_markdown

        echo(spec_reference_markdown(registry), nl=False)
        return
    echo(json.dumps(spec_class(registry).model_json_schema(), indent=2))


@app.command()
def validate(
    spec: SpecArg,
    overrides: SetOpt = None,
    print_spec: Annotated[
        bool,
        typer.Option(
            "--print-spec",
            help="Print the resolved spec as YAML (what a run "
            "stores), each field marked with the file, --set or default it "
            "came from.",
        ),
    ] = False,
) -> None:
    """Check a spec and print the resolved model (parameters, components) without training."""
    from gptkit.registry.registry import load_registry
    from gptkit.spec.files import compose_spec_file, explained_yaml, validate_composed
    from gptkit.training.plan import summarize

    composed = compose_spec_file(spec)
    resolved = validate_composed(composed, str(spec), overrides or [])
    runs = [resolved]
    if resolved.sweep or resolved.repeats > 1:
        from gptkit.training.sweep import check_sweep, is_search

        if is_search(resolved.sweep):
            from gptkit.training.search import check_search

            checked = check_search(composed.data, str(spec), overrides or [], resolved)
        else:
            checked = check_sweep(composed.data, str(spec), overrides or [], resolved)[1]
        runs = list(checked.values())
    from gptkit.spec.validate import spec_warnings

    for warning in spec_warnings(runs):
        echo(f"gptkit: warning: {warning}", err=True)
    registry = load_registry(tuple(resolved.plugins))
    warn_plugin_problems(registry)
    if print_spec:
        echo(explained_yaml(composed, resolved, overrides or []))
        return
    summary = summarize(resolved, registry)
    echo(f"{spec}: valid")
    echo(f"  name        {summary.name}")
    for slot, kind, fields, provider in summary.components:
        echo(f"  {slot:<11} {kind} {fields}  [{provider}]".rstrip())
    echo(f"  model       {summary.model}")
    if summary.sweep:
        echo(f"  sweep       {summary.sweep}")
    if summary.parameters is None:
        echo("  parameters  (install gptkit[train] to count them)")
        return
    echo(f"  vocab_size  {summary.vocab_size}")
    echo(f"  parameters  {summary.parameters / 1e6:.2f}M ({summary.parameters:,})")


@app.command()
def prepare(
    spec: SpecArg,
    overrides: SetOpt = None,
    workers: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--workers",
            min=1,
            help="Tokenizing processes (default: every core for char/byte on large corpora).",
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize the spec's corpus ahead of training into sharded, memory-mapped token files
    (reused by 'gptkit train'), and print the shard layout."""
    import time

    from gptkit.data.prepare import prepare_tokens
    from gptkit.spec.files import load_spec

    resolved = load_spec(spec, overrides or [])
    started = time.perf_counter()
    data = prepare_tokens(
        resolved.data, resolved.tokenizer, progress=not no_progress, workers=workers
    )
    elapsed = time.perf_counter() - started
    layout, meta = data.layout(elapsed), data.meta
    if as_json:
        echo(json.dumps(layout))
        return
    mb = meta["source_bytes"] / 1e6
    how = (
        "reused the cache"
        if data.cached
        else (
            f"tokenized in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.1f} MB/s, "
            f"{meta['workers']} process{'es' if meta['workers'] > 1 else ''})"
        )
    )
    echo(f"{resolved.data.source}: {mb:,.1f} MB, {meta['documents']:,} documents; {how}")
    echo(
        f"  tokenizer   {resolved.tokenizer.kind}, vocab {data.tokenizer.vocab_size:,}, "
        f"end-of-text id {data.tokenizer.eot_id}, ids as {meta['dtype']}"
    )
    echo(f"  cache       {data.folder}")
    for shard in meta["shards"]:
        echo(f"  {shard['file']}  {shard['tokens']:>14,} tokens")
    echo(
        f"  train       {len(data.train):>14,} tokens (first {1 - resolved.data.val_fraction:.0%})"
    )
    echo(f"  validation  {len(data.val):>14,} tokens (last {resolved.data.val_fraction:.0%})")
