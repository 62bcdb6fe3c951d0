"""The registry: slot -> kind -> component spec class, filled by calling every plugin's hooks."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gptkit.components.base import SLOTS as SLOT_TABLE
from gptkit.components.base import ComponentSpec
from gptkit.errors import GptkitError, PluginError, did_you_mean
from gptkit.registry.manager import (
    EXPLICIT_ORIGINS,
    PluginManager,
    autoload_enabled,
    env_plugin_modules,
    plugin_manager,
    provenance,
)

SLOTS = tuple(SLOT_TABLE)


def plugin_label(name: str, version: str, capital: bool = False) -> str:
    """How messages name a plugin: "plugin 'x' 1.2", or "plugin 'x' (version unknown)"."""
    shown = "(version unknown)" if version == "unknown" else version
    return f"{'P' if capital else 'p'}lugin '{name}' {shown}"


@dataclass(frozen=True)
class Registration:
    slot: str
    kind: str
    cls: type[ComponentSpec]
    provider: str  # plugin name
    version: str


@dataclass(eq=False)  # hashed by identity: spec classes are cached per registry
class Registry:
    """Every component the loaded plugins provide, and what went wrong loading them."""

    pm: PluginManager
    components: dict[str, dict[str, Registration]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # plugin name -> its problems (a clash is both providers'), for a plugin's contract tests
    problems_of: dict[str, list[str]] = field(default_factory=dict)
    # kinds refused at registration (a clash, a broken contract): slot -> kind -> why
    refused: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_manager(cls, pm: PluginManager) -> Registry:
        reg = cls(pm, {slot: {} for slot in SLOTS}, refused={slot: {} for slot in SLOTS})
        for slot in SLOTS:
            caller = getattr(pm.hook, SLOT_TABLE[slot].hook)
            # Call each plugin's hook on its own so a registration can be credited to its
            # provider, and a plugin that raises is reported without stopping the others.
            for impl in caller.get_hookimpls():
                info = pm.info(impl.plugin_name)
                version = info.version if info else "unknown"

                def register(
                    component: type, _slot=slot, _name=impl.plugin_name, _v=version
                ) -> None:
                    reg._add(_slot, component, _name, _v)

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except BaseException as exc:  # noqa: BLE001 - sys.exit included
                    problem = reg._problem(
                        f"{plugin_label(impl.plugin_name, version)}: gptkit_register_{slot} "
                        f"raised {exc!r}",
                        impl.plugin_name,
                    )
                    if info is not None and info.origin in EXPLICIT_ORIGINS:
                        # A module the user named is broken: said as its failed import is, not
                        # a warning lost before the spec's "unknown kind" error.
                        raise PluginError(
                            f"{problem} (from {info.origin})",
                            f"Fix the module's hook, or leave it out of {info.origin}.",
                        ) from None
        for info in pm.infos:
            if info.error:
                reg._problem(
                    f"{plugin_label(info.name, info.version)} ({info.origin}): {info.error}",
                    info.name,
                )
        return reg

    def _problem(self, message: str, *providers: str) -> str:
        """Record a problem, as the named plugins' (returns it)."""
        self.problems.append(message)
        for name in providers:
            self.problems_of.setdefault(name, []).append(message)
        return message

    def _add(self, slot: str, component: type, provider: str, version: str) -> None:
        where = plugin_label(provider, version)
        base = SLOT_TABLE[slot].base
        if not (isinstance(component, type) and issubclass(component, base)):
            self._problem(
                f"{where} registered {component!r} as a {slot}, but it is not a subclass of "
                f"{base.__name__}",
                provider,
            )
            return
        try:
            kind = component.kind_name()
        except TypeError as exc:
            self._problem(f"{where}: {exc}", provider)
            return
        try:
            # Validate the defaults too (pydantic does not by default), as a spec would use them.
            defaults = {
                name: f.get_default(call_default_factory=True)
                for name, f in component.model_fields.items()
                if not f.is_required()
            }
            component.model_validate({**defaults, "kind": kind})
        except ValidationError as exc:
            bad = [e for e in exc.errors() if e["type"] != "missing"]
            if bad:
                self._problem(
                    f"{where}: {slot} '{kind}' ({component.__name__}) has an invalid default: "
                    + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in bad),
                    provider,
                )
                return
        problem = SLOT_TABLE[slot].contract_problem(component)
        if problem is not None:
            self.refused[slot][kind] = self._problem(
                f"{where}: {slot} '{kind}': {problem}", provider
            )
            return
        existing = self.components[slot].get(kind)
        if existing is not None or kind in self.refused[slot]:
            # Neither provider wins: a spec naming the kind must not silently get the class of
            # a package other than the one its author meant (a built-in added later included).
            first = (
                plugin_label(existing.provider, existing.version)
                if existing is not None
                else "an earlier plugin"
            )
            self.components[slot].pop(kind, None)
            self.refused[slot][kind] = self._problem(
                f"{slot} kind '{kind}' is provided by both {first} and {where}; refusing "
                f"both: uninstall or rename one of them",
                provider,
                *([existing.provider] if existing is not None else []),
            )
            return
        self.components[slot][kind] = Registration(slot, kind, component, provider, version)

    def kinds_with_field(self, slot: str, key: str) -> list[str]:
        """The kinds of ``slot`` that have a field ``key`` (for "unknown key" messages)."""
        return sorted(
            kind
            for kind, reg in self.components.get(slot, {}).items()
            if key != "kind" and key in reg.cls.model_fields
        )

    def kinds(self, slot: str) -> list[str]:
        return sorted(self.components[slot])

    def classes(self, slot: str) -> list[type[ComponentSpec]]:
        return [self.components[slot][k].cls for k in self.kinds(slot)]

    def unknown_kind_message(self, slot: str, kind: object) -> str:
        refused = self.refused.get(slot, {}).get(str(kind))
        if refused is not None:
            return f"{slot} kind {kind!r} was refused: {refused}"
        installed = ", ".join(self.kinds(slot)) or "(none)"
        hint = did_you_mean(str(kind), self.kinds(slot))
        # A plugin that failed to load may be the one that provides it: show its real error.
        broken = "".join(
            f" {plugin_label(i.name, i.version, capital=True)} is installed but failed to load: "
            f"{i.error}."
            for i in self.pm.infos
            if i.error
        )
        return (
            f"unknown {slot} kind {kind!r}{hint}; installed: {installed}.{broken} "
            "Run 'gptkit plugins'."
        )

    def get(self, slot: str, kind: str) -> type[ComponentSpec]:
        try:
            return self.components[slot][kind].cls
        except KeyError:
            raise GptkitError(self.unknown_kind_message(slot, kind)) from None


@functools.lru_cache(maxsize=16)
def _cached_registry(modules: tuple[str, ...], env: tuple[str, ...], autoload: bool) -> Registry:
    return Registry.from_manager(plugin_manager(modules, autoload=autoload))


def load_registry(modules: tuple[str, ...] | list[str] = ()) -> Registry:
    """The registry for the built-ins, installed plugins and ``modules`` (cached per input)."""
    return _cached_registry(tuple(modules), env_plugin_modules(), autoload_enabled())


def clear_registry_cache() -> None:
    """Forget cached registries (after installing a plugin or changing ``GPTKIT_PLUGINS``)."""
    _cached_registry.cache_clear()


def spec_provenance(spec: Any) -> dict[str, dict[str, str]]:
    """:func:`provenance` of ``spec`` against the registry its own ``plugins:`` load."""
    return provenance(load_registry(tuple(spec.plugins)), spec)
