"""YAML parsing that refuses hostile documents before building anything.

Config files and ``--set`` values come from users and, on a cluster, from ConfigMaps that
others can edit; PyYAML's ``safe_load`` still expands aliases without limit (a "billion
laughs" bomb), follows recursive aliases until the stack runs out and nests without bound.
:func:`safe_yaml_load` composes the node graph first, checks it in linear time, then builds it.
"""

from __future__ import annotations

from typing import Any

import yaml

from openimages_od.errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "line_index", "safe_yaml_load"]

#: Most nodes a config document may expand to (aliases counted as often as they are used).
MAX_YAML_NODES = 100_000
#: Deepest nesting of mappings/sequences.
MAX_YAML_DEPTH = 64
#: Largest config file read.
MAX_CONFIG_BYTES = 4 << 20


def _check_yaml_node(root: yaml.Node, where: str) -> None:
    """Refuse alias bombs, recursive aliases and deep nesting before anything is constructed.

    The composed node graph shares aliased nodes; the size it would expand to is
    counted with one visit per distinct node (memoised), so the check itself is
    linear in the document.

    Raises:
        ConfigError: naming ``where`` and the line of the offending node.
    """
    size: dict[int, int] = {}
    active: set[int] = set()
    # Iterative post-order walk: (node, depth, children_done).
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            if isinstance(node, yaml.MappingNode):
                kids = [n for kv in node.value for n in kv]
            else:
                kids = list(node.value)
            total = 1 + sum(size[id(k)] for k in kids)
            size[nid] = total
            if total > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise ConfigError(
                    f"{where}:{line}: the document expands to more than {MAX_YAML_NODES} "
                    "nodes (YAML aliases used as a bomb?)"
                )
            continue
        if nid in size:
            continue
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            size[nid] = 1
            continue
        if nid in active:
            raise ConfigError(
                f"{where}:{node.start_mark.line + 1}: a YAML alias refers to itself (recursive)"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{where}:{node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels"
            )
        active.add(nid)
        stack.append((node, depth, True))
        kids = [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else node.value
        for k in kids:
            if id(k) not in size:
                stack.append((k, depth + 1, False))


def safe_yaml_load(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs, recursion and deep nesting first.

    Raises:
        ConfigError: the text is not valid YAML or is hostile (naming ``where`` and the line).
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}{loc}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def line_index(text: str) -> dict[str, int]:
    """Map dotted key paths in a YAML document to 1-based line numbers."""
    out: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}.{i}")

    walk(node, "")
    return out
