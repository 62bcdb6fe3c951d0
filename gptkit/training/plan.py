"""What a spec would train, before anything runs (``gptkit validate``): each component with
the plugin that provides it, the model's shape, the runs a sweep makes, and the parameter
count. Torch-free where it can be: without torch the count is left out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gptkit.components.base import SLOTS


@dataclass
class SpecSummary:
    name: str
    # (slot, kind, its fields as "k=v ...", the plugin that provides it)
    components: list[tuple[str, str, str, str]] = field(default_factory=list)
    model: str = ""
    sweep: str | None = None
    vocab_size: int | None = None
    parameters: int | None = None  # None: torch is not installed


def summarize(resolved: Any, registry: Any) -> SpecSummary:
    """The summary of a validated spec, against the registry its plugins load."""
    m = resolved.model
    summary = SpecSummary(resolved.name)
    for slot, entry in SLOTS.items():
        component: Any = resolved
        for key in entry.path:
            component = getattr(component, key)
        reg = registry.components[slot][component.kind]
        fields = component.model_dump(exclude={"kind"})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        summary.components.append((slot, component.kind, extra, reg.provider))
    summary.model = (
        f"{m.n_layers} layers, {m.n_heads} heads, d_model {m.d_model}, "
        f"d_ff {m.hidden_dim}, max_seq_len {m.max_seq_len}, dropout {m.dropout}, "
        f"{m.norm}, {m.activation}"
    )
    if resolved.sweep or resolved.repeats > 1:
        summary.sweep = sweep_size(resolved)
    summary.vocab_size, summary.parameters = _parameters(resolved)
    return summary


def sweep_size(resolved: Any) -> str:
    """``2 points x 3 seeds = 6 runs`` (and the grid's errors, before anything trains)."""
    try:
        from gptkit.training.sweep import is_search, sweep_plan
    except ImportError:  # the sweep runner needs torch; the count does not
        return "(install gptkit[train] to count the runs)"
    if is_search(resolved.sweep):
        from gptkit.training.search import describe

        return describe(resolved)
    plan = sweep_plan(resolved)
    runs = sum(len(r) for _, r in plan)
    seeds = f" x {len(plan[0][1])} seeds" if runs > len(plan) else ""
    return f"{len(plan)} point{'s' * (len(plan) != 1)}{seeds} = {runs} runs"


def _parameters(resolved: Any) -> tuple[int | None, int | None]:
    """(vocab_size, parameter count) of the model the spec builds, counted on the meta
    device (nothing allocated); the count is None without torch."""
    try:
        import torch

        from gptkit.model import build_model
    except ImportError:
        return None, None
    vocab = resolved.model.vocab_size
    if vocab is None:
        from gptkit.data.encode import fit_tokenizer

        vocab = fit_tokenizer(resolved.data, resolved.tokenizer).vocab_size  # a bounded sample
    with torch.device("meta"):  # count without allocating
        model = build_model(resolved, vocab_size=vocab)
    return vocab, model.num_params(non_embedding=False)
