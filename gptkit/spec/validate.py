"""Validation: a spec dict (plus ``--set`` overrides) into an ``ExperimentSpec``, with errors that
name the dotted field path and what would be accepted."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from gptkit.components.base import (
    SLOTS,
    ComponentSpec,
)
from gptkit.errors import GptkitError, SpecError, did_you_mean
from gptkit.registry.registry import Registry, load_registry
from gptkit.spec.models import SLOT_DEFAULTS, SLOT_PATHS, ExperimentSpec, spec_class
from gptkit.spec.yaml_loader import DuplicateKey, UniqueKeyLoader

_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.dropout=0.1`` -> (['model', 'dropout'], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise GptkitError(
            f"--set {text!r}: expected PATH=VALUE, for example --set model.dropout=0.1"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _PATH_RE.match(key):
        raise GptkitError(f"--set {text!r}: {key!r} is not a dotted field path like train.lr")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""  # noqa: S506
    except DuplicateKey as exc:
        raise GptkitError(f"--set {key}: {str(exc).split(': ', 1)[-1]}") from None
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise GptkitError(f"--set {key}: the value nests too deeply") from None
    from gptkit.safeio import check_tree

    check_tree(value, f"--set {key}")
    return _sweep_path(key.split(".")), value


def _sweep_path(path: list[str]) -> list[str]:
    """A sweep's (or search space's) keys are dotted field paths themselves:
    ``sweep.train.lr`` is the sweep's ``train.lr``, ``sweep.space.train.lr`` the space's."""
    from gptkit.spec.models import SEARCH_KEYS

    if path[0] != "sweep" or len(path) < 3:
        return path
    if path[1] == "space":
        return [*path[:2], ".".join(path[2:])]
    if path[1] in SEARCH_KEYS:
        return path
    return [path[0], ".".join(path[1:])]


def parse_sampler_overrides(sets: list[str]) -> dict[str, Any]:
    """``--set sampler.x=y``: generation changes only the sampler (runs and bundles alike)."""
    changes = {}
    for text in sets:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "sampler":
            raise GptkitError(f"--set {text!r}: generate takes sampler.FIELD=VALUE overrides only")
        changes[path[1]] = value
    return changes


def override_label(text: str, labels: Mapping[str, str] | None = None) -> str:
    """How an error names an override: ``--set 'train.lr=abc'``, or what the caller says it
    is (a sweep entry, say: the user never typed a ``--set`` for it)."""
    return (labels or {}).get(text) or f"--set {text!r}"


def apply_overrides(
    data: dict[str, Any],
    overrides: Iterable[str],
    registry: Registry | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``PATH=VALUE`` applied, in order.

    Changing a component's ``kind`` drops the fields the new kind does not have, so
    ``--set sampler.kind=greedy`` works on a spec whose sampler had ``p: 0.9``.
    """
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        name = override_label(text, labels)
        node: Any = data
        for i, key in enumerate(path[:-1]):
            child = node.get(key)
            slot_here = SLOT_PATHS.get(tuple(path[: i + 1]))
            if child is None and slot_here:
                # The spec leaves this component at its default: start from the default kind,
                # so `--set train.optimizer.weight_decay=0.01` needs no `kind`.
                child = node[key] = {"kind": SLOT_DEFAULTS[slot_here]}
            elif child is None:
                child = node[key] = {}
            elif isinstance(child, str) and tuple(path[: i + 1]) in SLOT_PATHS:
                child = node[key] = {"kind": child}  # bare component name
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise GptkitError(f"{name}: {where} is a {type(child).__name__}, not a section")
            node = child
        last = path[-1]
        slot = SLOT_PATHS.get(tuple(path[:-1]))
        if last == "kind" and slot and registry is not None and node.get("kind") != value:
            if value not in registry.components[slot]:
                raise GptkitError(f"{name}: " + registry.unknown_kind_message(slot, value))
            keep = registry.components[slot][value].cls.model_fields
            for stale in [k for k in node if k not in keep]:
                del node[stale]
        node[last] = value
    return data


def _model_at(cls: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that the error location ``loc`` points into."""
    current: Any = cls
    i = 0
    while i < len(loc):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        f = current.model_fields.get(str(loc[i]))
        if f is None:
            return None
        ann = f.annotation
        options = [a for a in _flatten(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(options) > 1 and i + 1 < len(loc):
            tagged = [
                o for o in options if issubclass(o, ComponentSpec) and o.kind_name() == loc[i + 1]
            ]
            current = tagged[0] if tagged else None
            i += 2
            continue
        current = options[0] if options else None
        i += 1
    return current if isinstance(current, type) else None


def _flatten(ann: Any) -> list[Any]:
    import typing

    args = typing.get_args(ann)
    if typing.get_origin(ann) is Annotated:
        return _flatten(args[0])
    if args and typing.get_origin(ann) in (Union, getattr(__import__("types"), "UnionType", Union)):
        return [x for a in args for x in _flatten(a)]
    return [ann]


def format_errors(
    exc: ValidationError, cls: type[BaseModel], registry: Registry
) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (dotted path, message) pairs a user can act on."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # A discriminated union puts the tag in the location: model.attention.gqa.n_kv_heads.
        clean: list[Any] = []
        stripped = False
        for part in loc:
            slot = SLOT_PATHS.get(tuple(clean))
            if slot and not stripped and part in registry.components.get(slot, {}):
                stripped = True  # only the tag right after the slot, not a field named alike
                continue
            clean.append(part)
        kind, msg = err["type"], err["msg"]
        if kind == "unknown_component":
            clean.append("kind")
        path = ".".join(str(p) for p in clean)
        if kind == "extra_forbidden":
            owner = _model_at(cls, loc[:-1])
            known = sorted(owner.model_fields) if owner else []
            msg = f"unknown key '{loc[-1]}'{did_you_mean(str(loc[-1]), known)}"
            if known:
                msg += f"; allowed here: {', '.join(known)}"
            msg += _kinds_with(registry, SLOT_PATHS.get(tuple(clean[:-1])), str(loc[-1]))
        elif kind == "cross_field":
            for sub, m in err.get("ctx", {}).get("problems", []):
                problems.append((f"{path}.{sub}" if path else sub, m))
            continue
        elif kind == "value_error":  # a validator's own message, without pydantic's prefix
            msg = msg.removeprefix("Value error, ")
        if kind not in (
            "unknown_component",
            "missing",
            "component_kind_missing",
            "extra_forbidden",
        ):
            value = err.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, (dict, list)) else None
            if shown is not None and len(shown) <= 60:
                msg += f" (got {shown})"
        problems.append((path, msg))
    return problems


def _kinds_with(registry: Registry, slot: str | None, key: str) -> str:
    """For an unknown key of a component: the kinds of its slot that have that field
    (``theta`` on a ``learned`` positional: "theta is a field of positional kind rope")."""
    kinds = registry.kinds_with_field(slot, key) if slot is not None else []
    if not kinds:
        return ""
    return f" ({key} is a field of {slot} kind{'s' if len(kinds) > 1 else ''} {', '.join(kinds)})"


def validate_spec(
    data: Mapping[str, Any],
    source: str = "<spec>",
    overrides: Iterable[str] = (),
    *,
    opened: bool = False,
    provenance: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> ExperimentSpec:
    """Validate a spec mapping (plus ``--set`` overrides) against the loaded plugins.

    ``opened=True`` for a spec read from a run or bundle (not one the user passed): its
    ``plugins:`` modules are imported only if they are installed gptkit plugins or the user
    allowed them (:func:`gptkit.registry.manager.check_opened_plugins`), and a kind no loaded plugin
    provides is reported with the package ``provenance`` names for it. A problem in a field an
    override set names the override (``labels`` says what each one is; default ``--set``).
    """
    from gptkit.registry.manager import allow_plugin_modules, check_opened_plugins

    overrides = list(overrides)
    raw = apply_overrides(
        dict(data), overrides, labels=labels
    )  # first pass: `plugins` may be overridden
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise SpecError(source, [("plugins", "must be a list of module names")])
    if opened:
        check_opened_plugins(plugins, source)
    else:
        allow_plugin_modules(plugins)  # the user's own spec: they named these modules
    registry = load_registry(tuple(plugins))
    if opened:
        _require_recorded_kinds(registry, raw, source, provenance or {})
    raw = apply_overrides(dict(data), overrides, registry, labels)
    cls = spec_class(registry)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise blame_overrides(
            source, format_errors(exc, cls, registry), overrides, labels
        ) from None


def blame_overrides(
    source: str,
    problems: list[tuple[str, str]],
    overrides: list[str],
    labels: Mapping[str, str] | None = None,
) -> SpecError:
    """The spec error, each problem in a field an override set naming that override (the last
    one that touched it); when every problem came from overrides, they head the error, not the
    spec file."""
    paths = [(tuple(parse_override(o)[0]), o) for o in overrides]
    blamed: dict[str, str] = {}
    out = []
    for where, message in problems:
        at = tuple(where.split(".")) if where else ()
        hits = [o for p, o in paths if at and (at[: len(p)] == p or p[: len(at)] == at)]
        if hits:
            blamed[where] = override_label(hits[-1], labels)
            message += f" (from {blamed[where]})"
        out.append((where, message))
    if problems and len(blamed) == len(problems):
        source = ", ".join(dict.fromkeys(blamed.values()))
    error = SpecError(source, out)
    error.overridden = set(blamed)
    return error


def _require_recorded_kinds(
    registry: Registry, raw: Mapping[str, Any], source: str, recorded: Mapping[str, Any]
) -> None:
    """Name the package behind each kind of an opened run/bundle that no plugin provides."""
    from gptkit.errors import PluginError
    from gptkit.registry.manager import missing_kind_message

    problems = []
    for name, slot in SLOTS.items():
        node: Any = raw
        for key in slot.path:
            node = node.get(key) if isinstance(node, Mapping) else None
        kind = node.get("kind") if isinstance(node, Mapping) else node
        if isinstance(kind, str):
            msg = missing_kind_message(registry, name, kind, recorded)
            if msg:
                problems.append(msg)
    if problems:
        raise PluginError(
            f"{source} " + "; and ".join(problems), "Run 'gptkit plugins' to see what is installed."
        )


def spec_warnings(specs: Any) -> list[str]:
    """Settings that validate but make little sense (each said once over a sweep's runs)."""
    out: dict[str, None] = {}
    for spec in specs:
        t = spec.train
        if t.warmup_steps > t.max_steps:
            out[
                f"train.warmup_steps ({t.warmup_steps}) > train.max_steps ({t.max_steps}): "
                "the learning rate never reaches train.lr"
            ] = None
        if t.eval_every > t.max_steps:
            out[
                f"train.eval_every ({t.eval_every}) > train.max_steps ({t.max_steps}): one "
                "evaluation and one checkpoint, at the last step"
                + (" (early_stop cannot act)" if t.early_stop is not None else "")
            ] = None
    return list(out)
