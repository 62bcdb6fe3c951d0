"""A bundle is exactly its manifest: the checks that make it so. Torch-free.

:func:`verify_bundle` is what every bundle load goes through. It trusts nothing a bundle says
about itself until it has checked it:

- ``gptkit.json`` is a bounded, regular file whose fields have the types the runtime needs
  (a field of the wrong type or a missing one is named in the error);
- every file in the folder is listed in the manifest and every listed file is there — an
  unlisted file, a symlink or anything but a regular file is refused — and each file's sha256
  matches (so a manifest that lists *nothing* protects nothing and is refused);
- every tensor of ``model.onnx`` that keeps its data outside the graph names a file of the
  bundle, for every ``location`` key, in every graph (``If``/``Loop``/``Scan`` branches and
  functions too).

:func:`removable_bundle` answers the export side: may gptkit replace this folder? Only when it
holds a bundle whose manifest lists every file in it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gptkit import safeio
from gptkit.components.tokenizers import TOKENIZER_FILE
from gptkit.errors import RunError

MANIFEST = "gptkit.json"
MODEL_FILE = "model.onnx"
TOKENIZER_MANIFEST = f"tokenizer/{TOKENIZER_FILE}"
MAX_MANIFEST_BYTES = 16 << 20

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Kind(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    kind: str


class _ManifestSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokenizer: _Kind
    sampler: _Kind | None = None
    plugins: list[str] = []  # modules the spec names (never imported for merely being named)


class _PluginOrigin(BaseModel):
    """Where a component of the bundle came from (``registry.manager.provenance``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    distribution: str = ""
    version: str = ""
    module: str = ""


class _SpecialTokens(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    eot: int = Field(ge=0)
    pad: int = Field(ge=0)


class Manifest(BaseModel):
    """The fields of ``gptkit.json`` the runtime relies on, with their types (others may
    follow; they are kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: int = Field(ge=1, le=1, description="Bundle format version; this gptkit reads 1.")
    files: dict[str, Sha256]
    spec: _ManifestSpec
    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    inputs: list[str]
    outputs: list[str]
    special_tokens: _SpecialTokens
    # Written by every export since the cache layout was recorded; typed when present.
    n_layers: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    cache: Literal["static", "concat"] | None = None
    precision: Literal["fp32", "int8"] | None = None  # what /v1/models says it serves
    plugins: dict[str, _PluginOrigin] | None = None  # "slot.kind" -> the plugin that made it


def check_model_path(path: Path) -> None:
    """A path that cannot be a bundle or a run, said as such before anything else is tried
    (``gptkit serve`` checks it before it takes its port)."""
    if not path.exists():
        raise RunError(
            f"bundle or run not found: {path}",
            "Pass an export bundle (gptkit export) or a training run folder (gptkit runs).",
        )
    if not path.is_dir():
        told = " (pass the bundle's folder)" if path.name == MANIFEST else ""
        raise RunError(
            f"{path} is a file; expected an export bundle's folder or a training run folder" + told
        )


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is (or was) an export bundle: it has a manifest, even a damaged one,
    or a bundle's graph and no run spec (a bundle whose manifest was deleted is still named as
    a damaged bundle, not taken for a run)."""
    folder = Path(folder)
    if os.path.lexists(folder / MANIFEST):
        return True
    from gptkit.store.rundir import SPEC_FILE

    return os.path.lexists(folder / MODEL_FILE) and not os.path.lexists(folder / SPEC_FILE)


def read_manifest(folder: Path) -> dict[str, Any]:
    """``gptkit.json`` as a dict, after its size, syntax, nesting and field types are checked."""
    path = folder / MANIFEST
    doc = safeio.read_json(path, "bundle manifest", MAX_MANIFEST_BYTES, RunError)
    if not isinstance(doc, dict):
        raise RunError(
            f"{path} must hold a JSON object, not a {type(doc).__name__}",
            "Export the bundle again: gptkit export RUN --out BUNDLE.",
        )
    try:
        Manifest.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise RunError(
            f"{path}: field '{field}': {err['msg']}",
            "The manifest is damaged; export the bundle again.",
        ) from None
    for name in doc["files"]:
        _check_name(name, path)
    for required in (MODEL_FILE, TOKENIZER_MANIFEST):
        if required not in doc["files"]:
            raise RunError(f"{path}: field 'files' does not list {required}; every bundle has it")
    return doc


def _check_name(name: str, manifest: Path) -> None:
    """A listed name is a plain relative path inside the bundle (no '..', not absolute)."""
    parts = PurePosixPath(name).parts
    if (
        not parts
        or name.startswith("/")
        or "\\" in name
        or any(p in ("..", ".") for p in parts)
        or name != "/".join(parts)
        or name == MANIFEST
    ):
        raise RunError(f"{manifest} lists {name!r}, which is not a file name inside the bundle")


def folder_files(folder: Path) -> set[str]:
    """Relative names of every file under ``folder``; refuses symlinks and special files."""
    found: set[str] = set()
    for rel, mode in safeio.entries(folder, RunError):
        if stat.S_ISDIR(mode):
            continue
        if stat.S_ISLNK(mode):
            raise RunError(
                f"bundle {folder}: {rel} is a symlink; a bundle holds regular "
                "files only (a link could point anywhere)"
            )
        if not stat.S_ISREG(mode):
            raise RunError(f"bundle {folder}: {rel} is not a regular file")
        found.add(rel)
    return found


def _sha256(path: Path) -> str:
    fd = safeio.open_regular(path, "bundle file", RunError)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check a bundle folder against its manifest; return the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(
            f"bundle not found: {folder}"
            if not folder.exists()
            else f"{folder} is a file; expected a bundle folder"
        )
    if not (folder / MANIFEST).exists():
        raise RunError(
            f"{folder} is not an export bundle (no {MANIFEST})",
            "Make one with: gptkit export RUN --out BUNDLE",
        )
    manifest = read_manifest(folder)
    listed = set(manifest["files"])
    present = folder_files(folder) - {MANIFEST}
    if present - listed:
        extra = sorted(present - listed)
        raise RunError(
            f"bundle {folder} holds {len(extra)} file(s) its manifest does not list: "
            f"{', '.join(extra[:5])}; a bundle is exactly its manifest",
            "Remove them, or export the bundle again.",
        )
    if listed - present:
        raise RunError(
            f"bundle {folder} is missing {', '.join(sorted(listed - present)[:5])}",
            "Export the bundle again.",
        )
    for name, digest in sorted(manifest["files"].items()):
        if _sha256(folder / name) != digest:
            raise RunError(
                f"bundle {folder}: {name} does not match its sha256 in {MANIFEST} "
                "(modified or damaged)",
                "Export the bundle again.",
            )
    proto = check_external_data(folder / MODEL_FILE, listed)
    check_graph_facts(proto, manifest, folder)
    return manifest


def check_graph_facts(proto: Any, manifest: dict[str, Any], folder: Path) -> None:
    """The manifest's shape fields must be what the graph says of itself (its
    ``gptkit.*`` metadata, written at export; a graph without it, from an older gptkit, is
    taken on the manifest's word): a manifest edited to a longer context would send the graph
    positions past its table."""
    facts = {p.key[len("gptkit.") :]: p.value for p in proto.metadata_props}
    for key, value in sorted(facts.items()):
        if key in manifest and str(manifest[key]) != value:
            raise RunError(
                f"bundle {folder}: {MANIFEST} says {key} {manifest[key]!r}, but its graph was "
                f"exported with {value} (the manifest was edited or belongs to another graph)",
                "Export the bundle again.",
            )


# --------------------------------------------------------------------------- ONNX external data


def _node_tensors(nodes) -> Iterator[Any]:
    """Every tensor held by ``nodes``' attributes, subgraphs (If/Loop/Scan bodies) included."""
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
            for st in [*sparse, *a.sparse_tensors]:
                yield from (st.values, st.indices)
            if a.HasField("g"):
                yield from graph_tensors(a.g)
            for g in a.graphs:
                yield from graph_tensors(g)


def graph_tensors(graph) -> Iterator[Any]:
    """Every tensor of an ONNX graph: initializers, sparse initializers, attributes, subgraphs."""
    yield from graph.initializer
    for st in graph.sparse_initializer:
        yield from (st.values, st.indices)
    yield from _node_tensors(graph.node)


def check_external_data(model_path: Path, listed: set[str]) -> Any:
    """Refuse a model whose tensors keep data anywhere but in a file the manifest lists;
    returns the graph (its tensors' external data not loaded)."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise RunError(f"{model_path} is not a readable ONNX model: {str(exc)[:300]}") from None
    try:
        tensors = [*graph_tensors(proto.graph)]
        for function in proto.functions:
            tensors += _node_tensors(function.node)
    except RecursionError:
        raise RunError(f"{model_path}: subgraphs nest too deeply; refusing to load it") from None
    for t in tensors:
        locations = [e.value for e in t.external_data if e.key == "location"]
        if t.data_location == onnx.TensorProto.EXTERNAL and len(locations) != 1:
            raise RunError(
                f"{model_path}: tensor '{t.name}' keeps external data with "
                f"{len(locations)} 'location' entries; refusing to load it"
            )
        for location in locations:
            if location not in listed or location in (MODEL_FILE,):
                raise RunError(
                    f"{model_path}: tensor '{t.name}' keeps its data at "
                    f"'{location}', outside the bundle's listed files; refusing to "
                    "load it"
                )
    return proto


# --------------------------------------------------------------------------- export side


def removable_bundle(folder: Path) -> str | None:
    """``None`` when gptkit may replace ``folder`` (missing, empty, or a bundle whose manifest
    lists every file in it); otherwise the reason it may not."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not a folder"
    if not any(folder.iterdir()):
        return None
    if not (folder / MANIFEST).is_file():
        return f"{folder} exists and is not an export bundle (no {MANIFEST})"
    try:
        manifest = read_manifest(folder)
        present = folder_files(folder) - {MANIFEST}
    except RunError as exc:
        return f"{folder} holds a {MANIFEST} that gptkit cannot vouch for ({exc.message})"
    unlisted = sorted(present - set(manifest["files"]))
    if unlisted:
        return f"{folder} holds files its bundle manifest does not list ({', '.join(unlisted[:5])})"
    return None
