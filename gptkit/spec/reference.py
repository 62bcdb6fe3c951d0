"""The spec reference, generated from the JSON Schema so it cannot drift from the code.

``gptkit schema --markdown > docs/spec-reference.md`` writes it; a test checks the committed
file is current.
"""

from __future__ import annotations

import json
from typing import Any


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].split("/")[-1]
    if "const" in prop:
        return json.dumps(prop["const"])
    if "enum" in prop:
        return " \\| ".join(json.dumps(e) for e in prop["enum"])
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " \\| ".join(_type(p, defs) for p in prop[key])
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}), defs)}"
    if prop.get("type") == "object":
        extra = prop.get("additionalProperties")
        return f"mapping to {_type(extra, defs)}" if isinstance(extra, dict) else "mapping"
    return prop.get("type", "any")


def _bounds(prop: dict[str, Any]) -> str:
    marks = {
        "exclusiveMinimum": "> {}",
        "minimum": ">= {}",
        "exclusiveMaximum": "< {}",
        "maximum": "<= {}",
        "pattern": "matches `{}`",
        "maxLength": "at most {} chars",
    }
    return ", ".join(fmt.format(prop[k]) for k, fmt in marks.items() if k in prop)


def _table(model: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> list[str]:
    rows = ["| field | type | default | notes |", "|---|---|---|---|"]
    for name, prop in model.get("properties", {}).items():
        if "default" in prop:
            default = json.dumps(prop["default"])
        else:
            empty = {"array": "[]", "object": "{}"}.get(prop.get("type", ""), "see below")
            default = "required" if name in model.get("required", []) else empty
        notes = " ".join(x for x in (prop.get("description", ""), _bounds(prop)) if x)
        rows.append(f"| `{prefix}{name}` | {_type(prop, defs)} | {default} | {notes} |")
    return rows


def spec_reference_markdown(registry=None) -> str:
    """Markdown: every section of the spec, then every component kind by slot."""
    from gptkit.registry.registry import SLOTS, load_registry
    from gptkit.spec.models import spec_class

    registry = registry or load_registry()
    schema = spec_class(registry).model_json_schema()
    defs = schema.get("$defs", {})
    out = [
        "# Spec reference",
        "",
        "Generated from the spec's JSON Schema (`gptkit schema --markdown`); do not edit.",
        "A component field takes `{kind: NAME, ...}` or just `NAME`.",
        "A spec file may also say `extends: FILE` (or a list of files, relative to it): see",
        "the README's *Composing specs*.",
        "",
        "## Top level",
        "",
        *_table(schema, defs),
        "",
    ]
    sections = {
        "DataSpec": "data",
        "ModelSpec": "model",
        "TrainSpec": "train",
        "EarlyStopSpec": "train.early_stop",
        "TrackingSpec": "tracking",
        "ExportSpec": "export",
    }
    for section, key in sections.items():
        if section in defs:
            out += [
                f"## `{key}:`",
                "",
                defs[section].get("description", ""),
                "",
                *_table(defs[section], defs, f"{key}."),
                "",
            ]
    out += ["## Components", ""]
    for slot in SLOTS:
        out += [f"### {slot}", ""]
        for kind in registry.kinds(slot):
            reg = registry.components[slot][kind]
            doc = (reg.cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += [
                f"#### `{kind}` — {reg.cls.__name__} ({reg.provider})",
                "",
                doc,
                "",
                *_table(reg.cls.model_json_schema(), defs),
                "",
            ]
    return "\n".join(out).rstrip() + "\n"
