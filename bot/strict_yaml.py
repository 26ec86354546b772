"""YAML loading that refuses a key given twice in one mapping.

Plain YAML loaders keep the last value of a repeated key without a word, so a persona file or hermes.yaml
edited in two places (`temperature:` under `sampling:` twice, say) silently runs on whichever came last.
Persona files and hermes.yaml are read with `StrictLoader`, which reports the repeat at its line instead.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base` may be overridden by the mapping's own keys


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises a marked error (line and column) for a repeated mapping key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:  # before SafeLoader flattens merge keys into the mapping
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            if key in first_line:
                raise ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def where_and_what(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """The 1-based line a YAML error points at (None if it names none) and its problem, for one-line
    messages (`str(exc)` spans several lines and names "<unicode string>")."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None and mark.line >= len(text.splitlines()):  # "end of stream": point at the opener
        mark = getattr(exc, "context_mark", None) or mark
    return (mark.line + 1 if mark else None), getattr(exc, "problem", None) or str(exc)


def load(text: str) -> Any:
    """The document in `text`, like `yaml.safe_load`, but a repeated key is a `yaml.YAMLError`."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
