"""Commands about specs and plugins: ``plugins``, ``schema``, ``validate``, ``prepare``."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from gptkit.cli._common import JsonOpt, SetOpt, SpecArg, app, echo, warn_plugin_problems


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List every plugin (name, version, origin) and the components it registers, by slot."""
    from gptkit.registry.registry import SLOTS, load_registry

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
    from gptkit.spec.files import compose_spec_file, validate_composed

    composed = compose_spec_file(spec)
    resolved = validate_composed(composed, str(spec), overrides or [])
    from gptkit.registry.registry import load_registry

    registry = load_registry(tuple(resolved.plugins))
    warn_plugin_problems(registry)
    if print_spec:
        echo(_explained_spec(composed, resolved, overrides or []))
        return
    sweep = _sweep_size(resolved) if resolved.sweep or resolved.repeats > 1 else None
    m = resolved.model
    echo(f"{spec}: valid")
    echo(f"  name        {resolved.name}")
    from gptkit.components.base import SLOTS

    for slot, entry in SLOTS.items():
        component: Any = resolved
        for key in entry.path:
            component = getattr(component, key)
        reg = registry.components[slot][component.kind]
        fields = component.model_dump(exclude={"kind"}, exclude_defaults=slot == "sampler")
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        echo(f"  {slot:<11} {component.kind} {extra}  [{reg.provider}]".rstrip())
    echo(
        f"  model       {m.n_layers} layers, {m.n_heads} heads, d_model {m.d_model}, "
        f"d_ff {m.hidden_dim}, max_seq_len {m.max_seq_len}, dropout {m.dropout}, "
        f"{m.norm}, {m.activation}"
    )
    if sweep:
        echo(f"  sweep       {sweep}")
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


def _sweep_size(resolved) -> str:
    """``2 points x 3 seeds = 6 runs`` (and the grid's errors, before anything trains)."""
    try:
        from gptkit.training.sweep import sweep_plan
    except ImportError:  # the sweep runner needs torch; the count does not
        return "(install gptkit[train] to count the runs)"
    plan = sweep_plan(resolved)
    runs = sum(len(r) for _, r in plan)
    seeds = f" x {len(plan[0][1])} seeds" if runs > len(plan) else ""
    return f"{len(plan)} point{'s' * (len(plan) != 1)}{seeds} = {runs} runs"


def _explained_spec(composed, resolved, sets: list[str]) -> str:
    """The resolved spec as YAML, each field marked with where its value came from."""
    from gptkit.spec.files import annotated_yaml
    from gptkit.spec.models import PRESETS
    from gptkit.spec.validate import parse_override

    set_paths = [tuple(parse_override(s)[0]) for s in sets]
    preset = resolved.model.preset

    def origin_of(path: tuple[str, ...]) -> str:
        if any(path[: len(p)] == p or p[: len(path)] == path for p in set_paths):
            return "--set"
        found = composed.origin(path)
        if found is None and preset and path[:1] == ("model",) and path[-1] in PRESETS[preset]:
            return f"preset {preset} ({composed.origin(('model', 'preset'))})"
        return f"from {found}" if found else "default"

    lines = [f"# resolved from: {' <- '.join(reversed(composed.files))}"]
    return "\n".join([*lines, annotated_yaml(resolved.to_dict(), origin_of)])


def _vocab_size_from_tokenizer(spec) -> int:
    from gptkit.data.encode import fit_tokenizer

    return fit_tokenizer(spec.data, spec.tokenizer).vocab_size  # on a bounded sample


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
    meta = data.meta
    layout = {
        "cache": str(data.folder),
        "reused": data.cached,
        "tokenizer": resolved.tokenizer.kind,
        "vocab_size": data.tokenizer.vocab_size,
        "eot_id": data.tokenizer.eot_id,
        "dtype": meta["dtype"],
        "tokens": meta["tokens"],
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "documents": meta["documents"],
        "source_bytes": meta["source_bytes"],
        "seconds": round(elapsed, 3),
        "shards": meta["shards"],
    }
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
