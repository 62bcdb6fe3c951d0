"""The plugin manager: built-ins first, then entry points, then modules the user names."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from types import ModuleType

import pluggy

from gptkit import hookspecs
from gptkit.components import BUILTINS
from gptkit.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "gptkit"
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("gptkit_"))


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin: what ``gptkit plugins`` prints."""

    name: str
    version: str
    origin: str  # "builtin", "entry point (dist-name)", "spec plugins:", "GPTKIT_PLUGINS"
    error: str | None = None


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)

    def add(self, module: object, name: str, version: str, origin: str) -> str | None:
        """Register ``module``; returns an error message instead of raising."""
        if self.is_registered(module):
            return None
        try:
            self.register(module, name=name)
        except Exception as exc:  # pluggy rejects bad hook signatures here
            self.infos.append(PluginInfo(name, version, origin, f"rejected: {exc}"))
            return str(exc)
        unknown = [hc.name for hc in self.get_hookcallers(module) or [] if not hc.has_spec()]
        if unknown:
            # A misspelled hook would silently never be called: refuse the plugin instead.
            self.unregister(module)
            msg = "; ".join(
                f"'{u}' is not a gptkit hook{did_you_mean(u, HOOK_NAMES)}" for u in unknown
            )
            self.infos.append(PluginInfo(name, version, origin, msg))
            return msg
        self.infos.append(PluginInfo(name, version, origin))
        return None


def _module_version(module: ModuleType) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    top = module.__name__.split(".")[0]
    for dist in md.packages_distributions().get(top, []):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def env_plugin_modules() -> tuple[str, ...]:
    """Modules named in ``GPTKIT_PLUGINS`` (comma-separated)."""
    raw = os.environ.get("GPTKIT_PLUGINS", "")
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def autoload_enabled() -> bool:
    return os.environ.get("GPTKIT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0", "false")


def plugin_manager(
    modules: tuple[str, ...] = (),
    *,
    builtins: tuple[str, ...] = BUILTINS,
    autoload: bool | None = None,
) -> PluginManager:
    """Build a fresh plugin manager.

    Order: the built-in component modules, then entry points of group ``gptkit`` (unless
    ``GPTKIT_DISABLE_PLUGIN_AUTOLOAD=1``), then ``GPTKIT_PLUGINS``, then ``modules`` (a spec's
    ``plugins:`` list). An entry point that fails is recorded and skipped; a module the user
    named explicitly that fails is a :class:`PluginError`.
    """
    from gptkit import __version__

    pm = PluginManager()
    for name in builtins:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name != "torch":
                raise
            raise PluginError(
                f"gptkit's built-in {name.rsplit('.', 1)[-1]} need PyTorch, which is not installed",
                "Install the training extra: pip install 'gptkit[train]' (exported bundles run "
                "without it: gptkit generate BUNDLE, gptkit serve BUNDLE).",
            ) from None
        pm.add(module, name, __version__, "builtin")

    if autoload if autoload is not None else autoload_enabled():
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            version = ep.dist.version if ep.dist is not None else "unknown"
            origin = f"entry point ({ep.dist.name})" if ep.dist is not None else "entry point"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                pm.infos.append(PluginInfo(ep.name, version, origin, f"failed to load: {exc!r}"))
                continue
            pm.add(obj, ep.name, version, origin)

    explicit = [(m, "GPTKIT_PLUGINS") for m in env_plugin_modules()]
    explicit += [(m, "spec plugins:") for m in modules]
    for name, origin in explicit:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise PluginError(
                f"plugin module '{name}' (from {origin}) could not be imported: {exc!r}",
                "Check the module name and that it is installed; run 'gptkit plugins'.",
            ) from None
        error = pm.add(module, name, _module_version(module), origin)
        if error:
            raise PluginError(f"plugin module '{name}' (from {origin}): {error}")
    return pm
