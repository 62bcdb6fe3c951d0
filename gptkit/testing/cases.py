"""The contract: one case per property per component, for every slot, and the one function
that runs a case. See the package docstring for how a plugin's tests use them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from gptkit.errors import did_you_mean
from gptkit.registry.registry import load_registry
from gptkit.testing.models import PARTNERS, WEIGHTED_POSITIONAL, run_model_case
from gptkit.testing.optimizers import run_optimizer_case
from gptkit.testing.samplers import run_sampler_case
from gptkit.testing.tokenizers import run_tokenizer_case

MODEL_PROPERTIES = (
    "shapes",
    "causal",
    "kv_cache",
    "static_cache",
    "joining",
    "padding",
    "gradients",
    "determinism",
    "onnx",
)
PROPERTIES: dict[str, tuple[str, ...]] = {
    # positional_weights: an attention leaves the positional scheme's weights alone (checked
    # with the built-in positional that has weights, whatever the case's partner).
    "attention": (*MODEL_PROPERTIES, "positional_weights"),
    "positional": MODEL_PROPERTIES,
    "tokenizer": ("torch_free", "roundtrip", "save_load"),
    "sampler": ("torch_free", "distribution", "seeded", "state"),
    "optimizer": ("descends", "zero_lr", "follows_lr", "state_weights_only"),
}


class Case(NamedTuple):
    """One contract test: a property of one component (for attention and positional, on a
    model whose other slot holds ``partner``)."""

    slot: str
    kind: str
    prop: str
    plugins: tuple[str, ...] = ()
    partner: str | None = None
    failure: str | None = None  # a plugin that could not be tested: why (slot "plugin")

    def __str__(self) -> str:
        default = PARTNERS.get(self.slot, ("", None))[1]
        kind = self.kind if self.partner in (None, default) else f"{self.kind}+{self.partner}"
        return f"{self.slot}-{kind}-{self.prop}"


def contract_cases(
    plugins: tuple[str, ...] | list[str] = (),
    *,
    provider: str | None = None,
    slots: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] | None = None,
    props: tuple[str, ...] | None = None,
    pairs: bool = False,
) -> list[Any]:
    """``pytest.param`` cases, one per (component, property), for :func:`run_contract`.

    ``plugins``: modules to load besides the installed ones; ``provider``: only components
    from this plugin (its entry-point name, module or distribution); ``slots`` / ``kinds`` /
    ``props``: narrow further; ``pairs``: run attention and positional components with
    every kind of the other slot (ids such as ``attention-gqa+alibi-kv_cache``), not only
    with the default partner.

    An installed plugin under test that did not load, whose hook raised, or whose component
    was refused (a name another plugin also registers, a class that is not a component) gets a
    failing ``plugin-NAME-loads`` case with the reason, as does a ``provider`` that names
    nothing loaded (``plugin-NAME-found``): the contract never passes by testing nothing. A
    module given in ``plugins`` that fails to import or whose hook raises is a
    ``PluginError`` at collection.
    """
    import pytest

    registry = load_registry(tuple(plugins))
    cases = [
        pytest.param(case, id=str(case)) for case in _load_failures(registry, plugins, provider)
    ]
    for slot in slots or PROPERTIES:
        for kind, reg in sorted(registry.components[slot].items()):
            if kinds is not None and kind not in kinds:
                continue
            if provider is not None and provider not in _provider_names(registry, reg):
                continue
            for partner, prop in _pairings(registry, slot, pairs):
                if props is None or prop in props:
                    case = Case(slot, kind, prop, tuple(plugins), partner)
                    # ONNX export takes tens of seconds on a CPU: outside the fast lane.
                    marks = [pytest.mark.slow] if prop == "onnx" else []
                    cases.append(pytest.param(case, id=str(case), marks=marks))
    return cases


def _load_failures(
    registry: Any, plugins: tuple[str, ...] | list[str], provider: str | None
) -> list[Case]:
    """A failing case for each plugin under test (``provider``, else the ``plugins`` modules)
    with load problems, and for a ``provider`` that matches no loaded plugin."""
    wanted = [provider] if provider is not None else list(plugins)
    out = []
    for name in wanted:
        plugin_names = [
            i.name for i in registry.pm.infos if name in _plugin_names(i)
        ] or _providers_named(registry, name)
        why = [p for n in plugin_names for p in registry.problems_of.get(n, [])]
        if why:
            out.append(Case("plugin", name, "loads", tuple(plugins), None, "; ".join(why)))
        elif not plugin_names:
            known = sorted({n for i in registry.pm.infos for n in _plugin_names(i) if n})
            out.append(
                Case(
                    "plugin",
                    name,
                    "found",
                    tuple(plugins),
                    None,
                    f"no plugin loaded is named {name!r} (by its entry point, module or "
                    f"distribution){did_you_mean(name, known)}; is it installed in this "
                    "environment?",
                )
            )
    return out


def _plugin_names(info: Any) -> set[str]:
    """The names a loaded plugin goes by: entry point, module (and its package), distribution."""
    return {info.name, info.module, info.module.split(".")[0], info.distribution or ""} - {""}


def _providers_named(registry: Any, name: str) -> list[str]:
    """Plugins that registered a component whose class's package is ``name``."""
    return sorted(
        {
            reg.provider
            for slot in registry.components.values()
            for reg in slot.values()
            if reg.cls.__module__.split(".")[0] == name
        }
    )


def _pairings(registry: Any, slot: str, pairs: bool) -> list[tuple[str | None, str]]:
    """(partner, property) for each case of a component in ``slot``. ``positional_weights``
    is one case whatever ``pairs`` says: it pairs with the weighted positional itself."""
    partners = _partners(registry, slot, pairs)
    out = [(p, prop) for p in partners for prop in PROPERTIES[slot] if prop != "positional_weights"]
    if "positional_weights" in PROPERTIES[slot]:
        out.append((WEIGHTED_POSITIONAL, "positional_weights"))
    return out


def _provider_names(registry: Any, reg: Any) -> set[str]:
    info = registry.pm.info(reg.provider)
    names = {reg.provider, reg.cls.__module__.split(".")[0]}
    if info is not None:
        names |= {info.module, info.distribution or ""}
    return names


def _partners(registry: Any, slot: str, pairs: bool) -> list[str | None]:
    if slot not in PARTNERS:
        return [None]
    other, default = PARTNERS[slot]
    return sorted(registry.kinds(other)) if pairs else [default]


def run_contract(case: Case, tmp_path: Any = None) -> None:
    """Run one contract case (``tmp_path``: a scratch folder, for ONNX and save/load). A
    failure is an ``AssertionError`` naming the component and the property; a component whose
    example cannot be built fails, naming what to add."""
    if case.failure is not None:
        import pytest

        pytest.fail(f"plugin {case.kind!r} cannot be tested: {case.failure}", pytrace=False)
    registry = load_registry(case.plugins)
    cls = registry.get(case.slot, case.kind)
    if case.prop == "positional_weights":
        case = case._replace(partner=WEIGHTED_POSITIONAL)
    elif case.slot in PARTNERS and case.partner is None:
        case = case._replace(partner=PARTNERS[case.slot][1])
    try:
        example = cls.example()
    except Exception as exc:
        import pytest

        pytest.fail(
            f"{case.slot} '{case.kind}' has no example values to build it from ({exc}); "
            "give its required fields examples=[...]"
        )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(tmp_path) if tmp_path is not None else Path(scratch)
        try:
            if case.slot in ("attention", "positional"):
                run_model_case(case, example, folder)
            elif case.slot == "tokenizer":
                run_tokenizer_case(case, example, registry, folder)
            elif case.slot == "sampler":
                run_sampler_case(case, example, registry, folder)
            else:
                run_optimizer_case(case, example, registry, folder)
        except AssertionError as exc:
            raise AssertionError(
                f"{_who(case)} fails the contract's {case.prop} property: {exc}"
            ) from exc
        except Exception as exc:  # a component that crashes in a check fails it (pytest's
            # skip and fail are not Exceptions: they pass through)
            raise AssertionError(
                f"{_who(case)} fails the contract's {case.prop} property: it raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _who(case: Case) -> str:
    """The component a case holds to the contract, and the part it is paired with."""
    who = f"{case.slot} '{case.kind}'"
    if case.partner is not None:
        who += f" (with {PARTNERS[case.slot][0]} '{case.partner}')"
    return who
