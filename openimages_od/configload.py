"""The layering machinery behind :mod:`openimages_od.config`, independent of the schema.

Reads a YAML file through :mod:`openimages_od.safe_yaml` (alias bombs, recursion, deep
nesting and oversized files are refused before anything is built), layers ``--set dotted.key=value`` overrides over it,
expands ``${NAME}`` / ``${NAME:-default}`` references while remembering where each one was,
and validates the result against any pydantic model, turning its errors into messages that
name the layer (``file:line`` or ``--set``), the dotted key and what was expected.

The schema (:class:`openimages_od.config.Config`) binds this to its sections; nothing here
knows a section name, so the module imports no schema and the schema imports it.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from openimages_od.errors import ConfigError
from openimages_od.safe_yaml import MAX_CONFIG_BYTES, line_index, safe_yaml_load

__all__ = [
    "EnvRefs",
    "Layers",
    "dump_with_references",
    "join_url",
    "merge_overrides",
    "normalize_root",
    "read_layers",
    "validate_layers",
]

#: Dotted path (keys and list indices) -> (the ``${VAR}`` text as written, the value it expanded to).
EnvRefs = dict[tuple[Any, ...], tuple[str, Any]]

ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------- URLs


def normalize_root(url: str) -> str:
    """Turn a relative or absolute path or file:// URL into an absolute URL-ish root.

    Local paths become absolute ``file://`` URLs; s3:// and http(s):// are kept.
    """
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        return url.rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return "file://" + str(Path(os.path.expanduser(path)).absolute()).rstrip("/")


def join_url(root: str, *parts: str) -> str:
    """Join ``parts`` under ``root`` with single slashes (empty parts are skipped)."""
    out = root.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


# --------------------------------------------------------------------------- ${VAR} expansion

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str, refs: EnvRefs | None = None, path: tuple[Any, ...] = ()) -> Any:
    """Expand ``${VAR}`` references; ``refs`` records each expanded path with its reference."""
    if isinstance(value, dict):
        return {
            k: _expand_env(v, f"{where}.{k}" if where else str(k), refs, (*path, k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]", refs, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        out = _expand_str(value, where)
        if refs is not None and _ENV_RE.search(value):
            refs[path] = (value, out)
        return out
    return value


def _expand_str(value: str, where: str) -> Any:
    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (referenced as ${{{name}}})")

    expanded = _ENV_RE.sub(repl, value)
    # "${X:-}" meaning "unset" maps to null so optional fields can be left out.
    return None if expanded == "" and value.strip().startswith("${") else expanded


def dump_with_references(data: Any, refs: EnvRefs) -> str:
    """``data`` as YAML, every value that came from ``${VAR}`` (and is unchanged) written as the reference.

    Secrets given through the environment so never reach the file.
    """
    return yaml.safe_dump(_with_references(data, refs), sort_keys=False, default_flow_style=False)


def _with_references(data: Any, refs: EnvRefs) -> Any:
    for path, (raw, value) in refs.items():
        node = data
        for k in path[:-1]:
            if isinstance(node, dict) and k in node:
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                node = None
                break
        last = path[-1] if path else None
        if node is None or last is None:
            continue
        if isinstance(node, dict) and last in node and node[last] == value:
            node[last] = raw
        elif isinstance(node, list) and isinstance(last, int) and last < len(node) and node[last] == value:
            node[last] = raw
    return data


# --------------------------------------------------------------------------- layering


@dataclass
class Layers:
    """The merged layers before validation.

    Attributes:
        data: The merged mapping (file, then overrides), ``${VAR}`` expanded.
        origin: Dotted key -> the layer that set it (``path:line`` or ``--set a.b=c``).
        refs: Where ``${VAR}`` references were expanded (see :data:`EnvRefs`).
    """

    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    refs: EnvRefs = field(default_factory=dict)


def read_layers(path: str | os.PathLike[str] | None, overrides: list[str]) -> Layers:
    """Read the YAML file at ``path`` (if any), layer ``overrides`` over it, expand ``${VAR}``.

    Raises:
        ConfigError: the file is unreadable, too big, not UTF-8, not YAML, hostile or not a
            mapping; an override is malformed; a referenced variable is unset.
    """
    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(
                    f"{p}: {p.stat().st_size} bytes; a config file may be at most {MAX_CONFIG_BYTES}"
                )
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        data = safe_yaml_load(text, str(p))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: expected a mapping of sections at the top level, got {type(data).__name__}"
            )
        lines = line_index(text)
        file_origin: dict[str, str] = {}
        merged = _deep_merge(merged, data, file_origin, str(p))
        origin.update({k: f"{p}:{lines[k]}" if k in lines else str(p) for k in file_origin})
    merged = merge_overrides(merged, overrides, origin)
    refs: EnvRefs = {}
    try:
        merged = _expand_env(merged, "", refs)
    except ConfigError as exc:
        raise ConfigError(f"{path or '--set'}: {exc}") from None
    return Layers(merged, origin, refs)


def merge_overrides(data: dict[str, Any], overrides: list[str], origin: dict[str, str]) -> dict[str, Any]:
    """Layer ``dotted.key=value`` strings over ``data``, recording their origin.

    Values are parsed as YAML scalars (``a.b=1`` is an int, ``a.b=[x, y]`` a list); text that
    is not valid YAML is taken as a string.

    Raises:
        ConfigError: an override is not ``dotted.key=value``, is hostile YAML, or descends
            into a key that is not a section.
    """
    for item in overrides:
        keys, value = _parse_override(item)
        # A --set must land in a mapping: "a.b=1" where a is a scalar is an error.
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, dict) and k in node and not isinstance(node[k], dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = node.get(k, {}) if isinstance(node, dict) else {}
        upd: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            upd = {k: upd}
        data = _deep_merge(data, upd, origin, f"--set {item}")
    return data


def _deep_merge(
    base: dict[str, Any], upd: dict[str, Any], origin: dict[str, str], label: str, prefix: str = ""
) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, origin, label, key)
        else:
            out[k] = copy.deepcopy(v)
            origin[key] = label
            if isinstance(v, dict):
                for sub in _flatten_keys(v, key):
                    origin[sub] = label
    return out


def _flatten_keys(d: dict[str, Any], prefix: str) -> list[str]:
    keys = []
    for k, v in d.items():
        key = f"{prefix}.{k}"
        keys.append(key)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, key))
    return keys


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = safe_yaml_load(raw, f"--set {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise  # hostile, not merely unquoted text
        value = raw
    return key.split("."), value


# --------------------------------------------------------------------------- validation


def validate_layers(
    model: type[ModelT], data: dict[str, Any], origin: dict[str, str], refs: EnvRefs | None = None
) -> ModelT:
    """Validate merged layers against ``model``.

    Raises:
        ConfigError: listing every invalid key with the layer that set it, what was expected
            and the value given (or, for a value from ``${VAR}``, the reference, never the value).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, _allowed_keys(model), refs or {})) from None


def _describe_type(err: ErrorDetails) -> str:
    t = err.get("type", "")
    msg = err.get("msg", "")
    ctx = err.get("ctx") or {}
    if t == "extra_forbidden":
        return "unknown key"
    if t == "missing":
        return "required key is missing"
    if t.endswith("_type") or t.endswith("_parsing"):
        expected = t.replace("_parsing", "").replace("_type", "")
        expected = {
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean (true/false)",
            "string": "a string",
            "list": "a list",
            "dict": "a mapping",
            "model": "a mapping",
        }.get(expected, expected)
        return f"expected {expected}"
    if t == "literal_error":
        return f"expected one of {ctx.get('expected', '')}"
    return msg[0].lower() + msg[1:] if msg else t


def _format_errors(
    exc: ValidationError,
    origin: dict[str, str],
    allowed: dict[str, list[str]],
    refs: EnvRefs | None = None,
) -> str:
    lines = []
    for err in exc.errors():
        ref = (refs or {}).get(tuple(err["loc"]))
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        where = "built-in defaults"
        for i in range(len(loc), 0, -1):
            cand = ".".join(loc[:i])
            if cand in origin:
                where = origin[cand]
                break
        if not dotted:  # model-level (cross-field) error
            lines.append(f"{err['msg'].removeprefix('Value error, ')}")
            continue
        desc = _describe_type(err)
        if err.get("type") == "extra_forbidden":
            got = err.get("input")
            while isinstance(got, dict) and len(got) == 1:  # name the full key that was given
                k, got = next(iter(got.items()))
                dotted = f"{dotted}.{k}"
            close = difflib.get_close_matches(loc[-1], allowed.get(".".join(loc[:-1]), []), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            desc = f"unknown key{hint}"
        got = err.get("input")
        got_s = (
            ""
            if err.get("type") in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        if ref is not None:  # the value came from the environment: show where, never what
            got_s = f" (from {ref[0]})"
        lines.append(f"{where}: {dotted}: {desc.removeprefix('value error, ')}{got_s}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    out = {prefix: list(model.model_fields)}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_allowed_keys(ann, f"{prefix}.{name}" if prefix else name))
    return out
