"""Read mapping YAML as a node tree that remembers where every value came from.

Contract: ``load(path) -> (root_node, construct)``. ``root_node`` is PyYAML's composed node
(``MappingNode``/``SequenceNode``/``ScalarNode``, each with ``start_mark.line``, 0-based);
``construct(node)`` turns any node into plain Python data with YAML 1.1 safe typing (what
``yaml.safe_load`` would give). ``line(node)`` is the 1-based line for messages. Nothing in a
mapping file is ever evaluated as code: this module only parses.

Duplicate keys in one mapping are an error here (PyYAML would silently keep the last), since a
rule with two ``eventName`` keys is a mistake the user must see.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


class YamlError(Exception):
    """The file is not YAML (or has duplicate keys): ``line`` is 1-based or None."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def line(node: Node) -> int:
    return node.start_mark.line + 1


def load(path: str | pathlib.Path, text: str | None = None) -> tuple[Node | None, Callable[[Node], Any]]:
    if text is None:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(mark.line + 1 if mark else None,
                        f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlError(None, f"not valid YAML: {exc}") from None
    if root is not None:
        _check_duplicates(root)

    def construct(node: Node) -> Any:
        return loader.construct_object(node, deep=True)

    return root, construct


def _check_duplicates(node: Node) -> None:
    if isinstance(node, MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode):
                if key.value in seen:
                    raise YamlError(line(key), f"duplicate key '{key.value}' "
                                    f"(first at line {seen[key.value]})")
                seen[key.value] = line(key)
            _check_duplicates(value)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _check_duplicates(item)


def mapping_items(node: MappingNode) -> list[tuple[str, ScalarNode, Node]]:
    """(key text, key node, value node) of a mapping whose keys are scalars."""
    return [(k.value if isinstance(k, ScalarNode) else str(k.value), k, v) for k, v in node.value]
