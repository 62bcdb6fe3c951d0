"""Spec files: read a YAML or TOML file (bounded, regular files only), compose it with its
``extends:`` parents, and validate it (``load_spec``).

``extends:`` a parent spec (or a list of them), and where each field came from.

A spec file may name the files it builds on::

    extends: base/tinyshakespeare_char.yaml        # or a list, applied in order
    model: {n_layers: 2}

The rules, in order of application (each parent resolved first, recursively):

- paths are relative to the file that names them; YAML and TOML mix freely;
- sections (mappings) merge key by key, the child's value winning;
- a component slot (``model.attention``, ``model.positional``, ``tokenizer``, ``sampler``,
  ``train.optimizer``) merges with the parent's only while the kind stays the same; a child that
  names another kind replaces the slot as a whole (the parent's ``p: 0.9`` does not leak into a
  ``greedy`` sampler);
- lists and scalars are replaced, and so is ``sweep`` (a grid is one thing, not a merge of two);
- a cycle (``a`` extends ``b`` extends ``a``) or a missing parent is an error naming the files.

The result has no ``extends`` key: it is what the run stores, so a run never depends on its parent
files again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptkit.errors import GptkitError
from gptkit.spec.models import ExperimentSpec
from gptkit.spec.yaml_loader import DuplicateKey, UniqueKeyLoader

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SPEC_BYTES = 1_000_000


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or TOML spec file into a mapping, with clear errors.

    The file must be a regular file of at most ``MAX_SPEC_BYTES`` (counted while reading), and
    the parsed document is bounded in depth and in size after YAML aliases
    (:func:`gptkit.safeio.check_tree`).
    """
    from gptkit import safeio

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise GptkitError(f"spec file not found: {path}", "Try one of experiments/*.yaml.")
    if path.is_dir():
        raise GptkitError(f"spec path is a directory, not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise GptkitError(f"spec file {path} has suffix '{path.suffix}'; use .yaml, .yml or .toml")
    text = safeio.read_text(path, "spec file", MAX_SPEC_BYTES)
    if not text.strip():
        raise GptkitError(
            f"spec file {path} is empty", "See experiments/smoke.yaml for an example."
        )
    data = parse_document(text, suffix, f"spec file {path}")
    if not isinstance(data, dict):
        raise GptkitError(
            f"spec file {path} must hold a mapping of fields (name:, model:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def parse_document(text: str, suffix: str, source: str) -> Any:
    """Parse YAML (also JSON) or TOML text; nesting and alias expansion are bounded."""
    from gptkit import safeio

    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except tomllib.TOMLDecodeError as exc:
        raise GptkitError(f"{source} is not valid TOML: {exc}") from None
    except DuplicateKey as exc:
        raise GptkitError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        where = str(exc).replace(
            "<unicode string>", source
        )  # the mark names the text, not the file
        raise GptkitError(f"{source} is not valid YAML: {where}") from None
    except RecursionError:
        raise GptkitError(
            f"{source} nests too deeply (at most {safeio.MAX_DEPTH} levels)"
        ) from None
    safeio.check_tree(data, source)
    return data


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentSpec:
    """Read a spec file (with the files it ``extends``), override and validate it."""
    spec: ExperimentSpec = validate_composed(compose_spec_file(path), str(path), overrides)
    return spec


# --------------------------------------------------------------------------- extends:


MAX_DEPTH = 32  # parents of parents; deeper than this is a mistake, not a design
MAX_FILES = 256  # distinct files in one composition, and entries in one 'extends' list
REPLACED_WHOLE = {("sweep",)}

FieldPath = tuple[str, ...]


@dataclass
class ComposedSpec:
    """A spec file with its parents merged in: the data, and the file each field came from."""

    data: dict[str, Any]
    origins: dict[FieldPath, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file read, parents first
    own_name: Any = None  # the ``name`` the file itself sets (not inherited)

    def origin(self, path: FieldPath) -> str | None:
        """The file that set ``path`` (or the section or slot holding it), if any did."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None


def compose_spec_file(path: str | Path) -> ComposedSpec:
    """Read a spec file and everything it ``extends``, merged by the rules above. Each file is
    read and composed once (a parent named many times is reused), so the work is bounded by
    :data:`MAX_FILES` files however the ``extends`` lists repeat each other."""
    memo: dict[Path, ComposedSpec] = {}
    composed = _resolve(Path(path), (), memo)
    _shared_experiment(composed, {str(k): c for k, c in memo.items()})
    return composed


def _real(path: Path) -> Path:
    """The file a path names (symlinks followed); a symlink loop stays as it is and is
    reported when the file is read."""
    return Path(os.path.realpath(path))


def _shared_experiment(composed: ComposedSpec, read: dict[str, ComposedSpec]) -> None:
    """Variants made with ``extends:`` share one MLflow experiment by default: the name of
    their root parent (the first file up the chain that has one), so the MLflow UI and
    ``gptkit compare`` show them side by side. An explicit ``tracking.experiment`` wins."""
    tracking = composed.data.get("tracking", {})
    if len(composed.files) < 2 or not isinstance(tracking, dict) or tracking.get("experiment"):
        return
    for label in composed.files[:-1]:  # parents first; the last is the spec itself
        parent = read.get(str(_real(Path(label))))
        own = parent.own_name if parent is not None else None
        name = own if own is not None else read_spec_file(Path(label)).get("name")
        if isinstance(name, str) and name:
            if name != composed.data.get("name"):
                composed.data["tracking"] = {**tracking, "experiment": name}
                composed.origins[("tracking", "experiment")] = f"the name of {label}"
            return


def _resolve(path: Path, chain: tuple[Path, ...], memo: dict[Path, ComposedSpec]) -> ComposedSpec:
    key = _real(path)
    if key in memo:
        return memo[key]
    if key in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(key) :], key))
        raise GptkitError(
            f"{path}: 'extends' makes a cycle: {loop}",
            "A spec may not extend itself, directly or through its parents.",
        )
    if len(chain) >= MAX_DEPTH:
        raise GptkitError(f"{path}: 'extends' goes more than {MAX_DEPTH} files deep")
    if len(memo) >= MAX_FILES:
        raise GptkitError(
            f"{path}: 'extends' brings in more than {MAX_FILES} spec files",
            "Compose from fewer files.",
        )
    data = read_spec_file(path)
    parents = _parent_paths(path, data.pop("extends", None))
    label = str(path)
    own = ComposedSpec(
        _normalise_slots(data), _leaf_origins(_normalise_slots(data), label), [label]
    )
    own.own_name = data.get("name")
    merged = ComposedSpec({})
    for parent in parents:
        merged = merge(merged, _resolve(parent, (*chain, key), memo))
    result = merge(merged, own) if parents else own
    result.own_name = own.own_name
    memo[key] = result
    return result


def _parent_paths(path: Path, extends: Any) -> list[Path]:
    """``extends`` as a list of existing files, relative to the file that names them."""
    if extends is None:
        return []
    names = [extends] if isinstance(extends, str) else extends
    if isinstance(names, list) and len(names) > MAX_FILES:
        raise GptkitError(
            f"{path}: extends lists {len(names):,} files; at most {MAX_FILES} are accepted"
        )
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise GptkitError(
            f"{path}: extends: give a file name or a list of file names "
            f"(relative to {path.parent or '.'}), got {extends!r}"
        )
    out = []
    for name in names:
        parent = Path(os.path.normpath(path.parent / name))
        if not parent.is_file():
            what = "not a regular file" if parent.exists() else "no such file"
            raise GptkitError(
                f"{path}: extends {name!r}: {what} ({parent})",
                "Paths in 'extends' are relative to the spec file that names them.",
            )
        out.append(parent)
    return out


def _slot_paths() -> dict[FieldPath, str]:
    from gptkit.spec.models import SLOT_PATHS

    return SLOT_PATHS


def _normalise_slots(data: dict[str, Any]) -> dict[str, Any]:
    """``positional: rope`` -> ``positional: {kind: rope}``, so slots merge like sections."""
    out = dict(data)
    for path in _slot_paths():
        node = out
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = child = dict(child)
            node = child
        else:
            if isinstance(node.get(path[-1]), str):
                node[path[-1]] = {"kind": node[path[-1]]}
    return out


def _leaf_origins(data: Any, label: str, prefix: FieldPath = ()) -> dict[FieldPath, str]:
    if isinstance(data, dict) and data and prefix not in REPLACED_WHOLE:
        out: dict[FieldPath, str] = {}
        for k, v in data.items():
            out.update(_leaf_origins(v, label, (*prefix, str(k))))
        return out
    return {prefix: label} if prefix else {}


def merge(base: ComposedSpec, child: ComposedSpec) -> ComposedSpec:
    """``child`` over ``base``: sections merge, a slot whose kind changes is replaced whole."""
    replaced: list[FieldPath] = []
    data = _merge_dicts(base.data, child.data, (), replaced)
    origins = {p: o for p, o in base.origins.items() if not any(p[: len(r)] == r for r in replaced)}
    origins.update(child.origins)
    files = list(dict.fromkeys([*base.files, *child.files]))  # a parent named twice: once
    return ComposedSpec(data, origins, files)


def _merge_dicts(
    base: dict[str, Any], child: dict[str, Any], prefix: FieldPath, replaced: list[FieldPath]
) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        here = (*prefix, str(key))
        old = out.get(key)
        mergeable = isinstance(old, dict) and isinstance(value, dict) and here not in REPLACED_WHOLE
        if mergeable and here in _slot_paths():
            assert isinstance(old, dict)
            mergeable = value.get("kind", old.get("kind")) == old.get("kind")
        if mergeable:
            assert isinstance(old, dict)
            out[key] = _merge_dicts(old, value, here, replaced)
        else:
            out[key] = value
            replaced.append(here)
    return out


def validate_composed(composed: ComposedSpec, source: str, overrides: Any = ()) -> Any:
    """Validate a composed spec; a problem in a field a parent set names that parent."""
    from gptkit.errors import SpecError
    from gptkit.spec.validate import validate_spec

    try:
        return validate_spec(composed.data, source, overrides)
    except SpecError as exc:
        if len(composed.files) < 2:
            raise
        problems = []
        for where, message in exc.problems:
            blamed = where in exc.overridden  # the override named already, not a file
            origin = composed.origin(tuple(where.split("."))) if where and not blamed else None
            problems.append(
                (
                    where,
                    message
                    + (f" (set in {origin})" if origin and origin != composed.files[-1] else ""),
                )
            )
        error = SpecError(exc.source, problems, exc.hint)
        error.overridden = exc.overridden
        raise error from None


# --------------------------------------------------------------------------- showing it


def annotated_yaml(data: dict[str, Any], origin_of: Any) -> str:
    """``data`` as block YAML with ``# from FILE`` after each field; ``origin_of(path)`` says
    where a field came from. The text loads back (``yaml.safe_load``) to ``data``."""
    lines: list[tuple[str, str]] = []
    _emit(data, (), 0, origin_of, lines)
    width = max(len(text) for text, _ in lines if _) if any(c for _, c in lines) else 0
    return "\n".join(f"{text:<{width}}  # {note}" if note else text for text, note in lines)


def _emit(
    data: dict[str, Any],
    prefix: FieldPath,
    indent: int,
    origin_of: Any,
    lines: list[tuple[str, str]],
) -> None:
    pad = "  " * indent
    for key, value in data.items():
        here = (*prefix, str(key))
        if isinstance(value, dict) and value and here not in REPLACED_WHOLE:
            lines.append((f"{pad}{_flow(key)}:", ""))
            _emit(value, here, indent + 1, origin_of, lines)
        else:
            lines.append((f"{pad}{_flow(key)}: {_flow(value)}", origin_of(here)))


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def explained_yaml(composed: ComposedSpec, resolved: Any, sets: list[str]) -> str:
    """The resolved spec as YAML, each field marked with where its value came from."""
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
