"""PyYAML's safe loader, refusing a key given twice in one mapping (``UniqueKeyLoader``): spec
files and ``--set`` values are read with it."""

from __future__ import annotations

from typing import Any

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: YAML says keys are
    unique, and PyYAML would keep the last one silently (``train: {lr: 0.5}`` then ``train:
    {max_steps: 5}`` lost the learning rate). TOML refuses them itself. A key set again after
    a merge (``<<: *base``) is an override, not a duplicate."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if duplicate:
                raise DuplicateKey(
                    f"line {key_node.start_mark.line + 1}: found the key {key!r} twice in one "
                    "mapping (the second would silently replace the first)"
                )
        return super().construct_mapping(node, deep)


class DuplicateKey(yaml.YAMLError):
    """A YAML mapping that gives a key twice (``UniqueKeyLoader``)."""
