"""The plugin manager: built-ins first, then entry points, then modules the user names.

Also the trust rule for runs and bundles (:func:`check_opened_plugins`) and plugin provenance
(:func:`provenance`, :func:`missing_kind_error`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from gptkit.components import BUILTINS
from gptkit.components.base import SLOTS
from gptkit.errors import PluginError, did_you_mean
from gptkit.registry import hookspecs

ENTRY_POINT_GROUP = "gptkit"
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("gptkit_"))
# Where a module the user named comes from: the environment, or a list (a spec's plugins:,
# --plugin, gptkit.testing's contract_cases([...])). Such a module that fails is an error.
EXPLICIT_ORIGINS = ("GPTKIT_PLUGINS", "plugins: or --plugin")


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin: what ``gptkit plugins`` prints."""

    name: str
    version: str
    origin: str  # "builtin", "entry point (dist-name)", or one of EXPLICIT_ORIGINS
    error: str | None = None
    module: str = ""  # the import name of the plugin module
    distribution: str | None = None  # the installed package that ships it, if any


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)

    def add(
        self, module: object, name: str, version: str, origin: str, distribution: str | None = None
    ) -> str | None:
        """Register ``module``; returns an error message instead of raising."""
        if self.is_registered(module):
            return None
        mod_name = getattr(module, "__name__", name)
        if distribution is None and isinstance(module, ModuleType):
            distribution = _distribution_of(module.__name__)
        try:
            self.register(module, name=name)
        except Exception as exc:  # pluggy rejects bad hook signatures here
            self.infos.append(
                PluginInfo(name, version, origin, f"rejected: {exc}", mod_name, distribution)
            )
            return str(exc)
        unknown = [hc.name for hc in self.get_hookcallers(module) or [] if not hc.has_spec()]
        if unknown:
            # A misspelled hook would silently never be called: refuse the plugin instead.
            self.unregister(module)
            msg = "; ".join(
                f"'{u}' is not a gptkit hook{did_you_mean(u, HOOK_NAMES)}" for u in unknown
            )
            self.infos.append(PluginInfo(name, version, origin, msg, mod_name, distribution))
            return msg
        self.infos.append(PluginInfo(name, version, origin, None, mod_name, distribution))
        return None


def _distribution_of(module_name: str) -> str | None:
    """The installed distribution that ships the top-level package of ``module_name``."""
    top = module_name.split(".")[0]
    if top == "gptkit":  # the built-ins: no need to read every installed file list
        return "gptkit"
    for dist in _packages_distributions().get(top, []):
        return dist
    return None


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    """Top-level package -> distributions, read once per process: building it reads every
    installed distribution's file list (seconds in a large environment)."""
    return md.packages_distributions()


def _module_version(module: ModuleType) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    dist = _distribution_of(module.__name__)
    if dist:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "unknown"


def _describe(exc: BaseException) -> str:
    """The real error, named: SystemExit and KeyboardInterrupt included."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) while importing"
    if isinstance(exc, KeyboardInterrupt):
        return "raised KeyboardInterrupt while importing"
    return f"{type(exc).__name__}: {exc}"


def env_plugin_modules() -> tuple[str, ...]:
    """Modules named in ``GPTKIT_PLUGINS`` (comma-separated)."""
    raw = os.environ.get("GPTKIT_PLUGINS", "")
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def autoload_enabled() -> bool:
    return os.environ.get("GPTKIT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0", "false")


def _add_builtins(pm: PluginManager, builtins: tuple[str, ...], torch_optional: bool) -> None:
    """Load gptkit's own component modules into ``pm`` (see :func:`plugin_manager`)."""
    from gptkit import __version__

    for name in builtins:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name != "torch":
                raise
            if torch_optional:
                pm.infos.append(
                    PluginInfo(
                        name,
                        __version__,
                        "builtin",
                        "needs PyTorch, which is not installed (pip install 'gptkit[train]')",
                        name,
                        None,
                    )
                )
                continue
            raise PluginError(
                f"gptkit's built-in {name.rsplit('.', 1)[-1]} components (the model's parts) "
                "need PyTorch, which is not installed",
                "Install the training extra: pip install 'gptkit[train]' (exported bundles run "
                "without it: gptkit generate BUNDLE, gptkit serve BUNDLE).",
            ) from None
        pm.add(module, name, __version__, "builtin")


def plugin_manager(
    modules: tuple[str, ...] = (),
    *,
    builtins: tuple[str, ...] = BUILTINS,
    autoload: bool | None = None,
    torch_optional: bool = False,
) -> PluginManager:
    """Build a fresh plugin manager.

    Order: the built-in component modules, then entry points of group ``gptkit`` (unless
    ``GPTKIT_DISABLE_PLUGIN_AUTOLOAD=1``), then ``GPTKIT_PLUGINS``, then ``modules`` (a spec's
    ``plugins:`` list). An entry point that fails is recorded and skipped; a module the user
    named explicitly that fails is a :class:`PluginError`. ``torch_optional``: without
    PyTorch, record the built-ins that need it as not loaded instead of refusing (``gptkit
    plugins`` lists what the torch-free slots hold).
    """

    pm = PluginManager()
    _add_builtins(pm, builtins, torch_optional)

    if autoload if autoload is not None else autoload_enabled():
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            version = ep.dist.version if ep.dist is not None else "unknown"
            origin = f"entry point ({ep.dist.name})" if ep.dist is not None else "entry point"
            dist = ep.dist.name if ep.dist is not None else None
            module = ep.value.split(":")[0].strip()
            try:
                obj = ep.load()
            # A broken plugin must not take the others down, nor end the process: sys.exit and
            # KeyboardInterrupt during its import are reported like any other failure.
            except BaseException as exc:  # noqa: BLE001
                pm.infos.append(
                    PluginInfo(
                        ep.name,
                        version,
                        origin,
                        f"failed to import: {_describe(exc)}",
                        module,
                        dist,
                    )
                )
                continue
            pm.add(obj, ep.name, version, origin, dist)

    explicit = [(m, EXPLICIT_ORIGINS[0]) for m in env_plugin_modules()]
    explicit += [(m, EXPLICIT_ORIGINS[1]) for m in modules]
    for name, origin in explicit:
        try:
            module = importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - sys.exit on import is a broken plugin too
            if isinstance(exc, ModuleNotFoundError) and exc.name == name:
                raise PluginError(
                    f"plugin module '{name}' (from {origin}) could not be imported: it was not "
                    "found on the import path",
                    f"Install it, or for a {name}.py of your own folder put that folder on the "
                    f"import path: PYTHONPATH=. gptkit ... (or pip install -e a package).",
                ) from None
            dist = _distribution_of(name)
            where = f" ({dist} {_dist_version(dist)})" if dist else ""
            raise PluginError(
                f"plugin module '{name}'{where} (from {origin}) is broken: it could not be "
                f"imported: {_describe(exc)}",
                "Check the module name and that it is installed; run 'gptkit plugins'.",
            ) from None
        error = pm.add(module, name, _module_version(module), origin)
        if error:
            raise PluginError(f"plugin module '{name}' (from {origin}): {error}")
    return pm


def _dist_version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- trust

# Modules the user named in this process (``--plugin``, a spec file they passed): these may be
# imported when a run or bundle names them.
_USER_NAMED: set[str] = set()


def allow_plugin_modules(modules: Iterable[str]) -> None:
    """Record modules the user named themselves (``--plugin``, their own spec's ``plugins:``)."""
    _USER_NAMED.update(m for m in modules if m)


def entry_point_modules() -> set[str]:
    """Import names of the modules installed gptkit plugins point their entry points at."""
    return {ep.value.split(":")[0].strip() for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def check_opened_plugins(modules: Iterable[str], source: str) -> None:
    """The trust rule for a run or bundle someone else may have made.

    Opening one imports only modules that are installed gptkit plugins (entry points of group
    ``gptkit``) or that the user named (``--plugin``, ``GPTKIT_PLUGINS``, a spec file they
    passed). Any other module its ``plugins:`` names is refused with a :class:`PluginError`.
    """
    allowed = _USER_NAMED | set(env_plugin_modules())
    refused = [m for m in modules if m not in allowed]
    if refused:
        installed = entry_point_modules()
        refused = [m for m in refused if m not in installed]
    if refused:
        names = ", ".join(f"'{m}'" for m in refused)
        first = refused[0]
        raise PluginError(
            f"{source} names plugin module(s) {names} under plugins:, which are not installed "
            "gptkit plugins; gptkit does not import a module just because a run or bundle "
            "names it (it could run any code).",
            f"If you trust it, allow it: GPTKIT_PLUGINS={','.join(refused)} gptkit ... "
            f"or gptkit --plugin {first} ...",
        )


# --------------------------------------------------------------------------- provenance


def provenance(registry: Any, spec: Any) -> dict[str, dict[str, str]]:
    """Which plugin provides each non-built-in component of ``spec``.

    Returns ``{"<slot>.<kind>": {"distribution", "version", "module"}}``: what the trainer
    stores with a run (``RunDir.plugins_file``) and a bundle under the manifest key
    ``plugins``. ``distribution`` is the pip-installable package ("" for a module that is
    not part of an installed one).
    """

    out: dict[str, dict[str, str]] = {}
    for slot, entry in SLOTS.items():
        component = spec
        for key in entry.path:
            component = getattr(component, key)
        reg = registry.components[slot].get(component.kind)
        info = registry.pm.info(reg.provider) if reg else None
        if reg is None or info is None or info.origin == "builtin":
            continue
        out[f"{slot}.{component.kind}"] = {
            "distribution": info.distribution or "",
            "version": reg.version,
            "module": reg.cls.__module__,
        }
    return out


def missing_kind_message(
    registry: Any, slot: str, kind: str, recorded: Mapping[str, Any] | None = None
) -> str | None:
    """Why ``kind`` is not available, naming the package to install, or None if it is."""
    if kind in registry.components[slot]:
        return None
    origin = recorded.get(f"{slot}.{kind}") if isinstance(recorded, Mapping) else None
    if not isinstance(origin, Mapping):
        return None
    refused = registry.refused.get(slot, {}).get(kind)
    if refused is not None:  # installed, but refused (e.g. two plugins register the name)
        return f"needs {slot} kind '{kind}', which was refused: {refused}"

    def said(key: str) -> str:  # a run's record is a file: what is not text is not said
        value = origin.get(key)
        return value if isinstance(value, str) else ""

    dist, version, module = said("distribution"), said("version") or "unknown", said("module")
    failed = next(
        (
            i
            for i in registry.pm.infos
            if i.error
            and (
                (dist and i.distribution == dist)
                or (module and module.startswith(i.module or "\0"))
            )
        ),
        None,
    )
    if failed is not None:
        return (
            f"needs {slot} kind '{kind}' from {dist or module} {version}, which is "
            f"installed but failed to load: {failed.error}"
        )
    if dist:
        return f"needs {slot} kind '{kind}' from {dist} {version}: pip install {dist}"
    return (
        f"needs {slot} kind '{kind}' from module '{module}' (not an installed package): "
        f"make it importable and allow it with GPTKIT_PLUGINS={module.split('.')[0]}"
    )


def check_hooks_in_sync(hooks_module: Any = hookspecs) -> None:
    """The hooks of ``hookspecs`` and the slot table must name the same slots (checked when
    the manager is first imported)."""
    hooks = {
        n
        for n in dir(hooks_module)
        if n.startswith("gptkit_register_") and callable(getattr(hooks_module, n))
    }
    table = {s.hook for s in SLOTS.values()}
    if hooks != table:
        raise ImportError(
            f"gptkit.registry.hookspecs and the slot table disagree: hooks without a slot "
            f"{sorted(hooks - table)}, slots without a hook {sorted(table - hooks)}"
        )


check_hooks_in_sync()
