"""Class names, MIDs, the box hierarchy and class selection.

* Class descriptions: ``MID,DisplayName`` rows, with a ``LabelName,DisplayName``
  header from V6 on and none before; names may contain commas (quoted).
* The box hierarchy (V4+): nested ``{"LabelName", "Subcategory": [...], "Part": [...]}``.
  The root ``/m/0bl9f`` is not a class; a class can sit under several parents.
  Only ``Subcategory`` edges mean "is a kind of" (used for subclasses and for
  the evaluation's label expansion); ``Part`` edges are ignored.
* The V2 trainable set: one MID a line, or a label map ``.pbtxt``.

Selection order (it fixes the label-map ids): the order of ``selection.classes``
with each class's subclasses following it in class-descriptions order; for
"all classes", class-descriptions file order.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from openimages_od.errors import ConfigError, DataError, UsageError
from openimages_od.openimages.labelmap import parse_pbtxt

__all__ = [
    "ROOT_MID",
    "ClassDescriptions",
    "Hierarchy",
    "is_mid",
    "read_class_descriptions",
    "read_hierarchy",
    "read_trainable",
    "resolve_classes",
]

ROOT_MID = "/m/0bl9f"


def is_mid(s: str) -> bool:
    """True for a Freebase (``/m/...``) or Knowledge Graph (``/g/...``) machine ID."""
    return (s.startswith("/m/") or s.startswith("/g/")) and len(s) > 3


@dataclass
class ClassDescriptions:
    """MIDs in file order and their display names."""

    mids: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)

    def index(self) -> dict[str, int]:
        return {m: i for i, m in enumerate(self.mids)}


def read_class_descriptions(text: str, display: str) -> ClassDescriptions:
    """Parse class descriptions, with or without the ``LabelName,DisplayName`` header.

    Raises:
        DataError: a row without two fields, a first row that is neither a header nor a MID,
            or a file with no classes.
    """
    out = ClassDescriptions()
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        rows = list(enumerate(reader, start=1))
    except csv.Error as exc:  # e.g. a bare CR inside an unquoted field
        raise DataError(f"{display}:{reader.line_num}: not a valid CSV row ({exc})") from None
    for lineno, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < 2:
            raise DataError(f"{display}:{lineno}: expected MID,DisplayName, got {','.join(row)!r}")
        mid, name = row[0].strip(), ",".join(row[1:]).strip() if len(row) > 2 else row[1].strip()
        if lineno == 1 and not is_mid(mid):
            if [c.strip().lower() for c in row[:2]] in (
                ["labelname", "displayname"],
                ["mid", "displayname"],
                ["label", "class"],
            ):
                continue
            raise DataError(
                f"{display}: unknown class-descriptions layout: header {','.join(row)!r} "
                "(expected MID,DisplayName rows, optionally under a LabelName,DisplayName header)"
            )
        if not is_mid(mid):
            raise DataError(f"{display}:{lineno}: {mid!r} is not a MID (/m/... or /g/...)")
        if mid not in out.names:
            out.mids.append(mid)
            out.names[mid] = name
    if not out.mids:
        raise DataError(f"{display}: no classes found")
    return out


@dataclass
class Hierarchy:
    """The Subcategory DAG: children and parents per MID (the root excluded from ``classes``)."""

    children: dict[str, list[str]] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every LabelName except the root, first-seen order

    @property
    def classes(self) -> set[str]:
        return set(self.order)

    def descendants(self, mid: str) -> list[str]:
        """Every class below ``mid`` (any depth, each once, first-seen depth-first order)."""
        out: list[str] = []
        seen = {mid}
        stack = list(reversed(self.children.get(mid, [])))
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            out.append(m)
            stack.extend(reversed(self.children.get(m, [])))
        return out

    def ancestors(self, mid: str) -> list[str]:
        """Every class above ``mid`` through any parent (the root excluded)."""
        out: list[str] = []
        seen = {mid}
        stack = list(self.parents.get(mid, []))
        while stack:
            m = stack.pop()
            if m in seen or m == ROOT_MID:
                continue
            seen.add(m)
            out.append(m)
            stack.extend(self.parents.get(m, []))
        return out


def read_hierarchy(text: str, display: str) -> Hierarchy:
    """Parse the V4+ box hierarchy JSON.

    Raises:
        DataError: not JSON, or not the ``LabelName``/``Subcategory`` format (e.g. the V2
            visualiser's names-only ``name``/``children`` tree).
    """
    try:
        root = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{display}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{display}: JSON nested too deeply to be a class hierarchy") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{display}: not usable JSON ({str(exc)[:120]})") from None
    if not isinstance(root, dict) or "LabelName" not in root:
        keys = sorted(root) if isinstance(root, dict) else type(root).__name__
        raise DataError(
            f"{display}: unknown hierarchy format (top-level keys {keys}); expected the V4+ "
            '{"LabelName", "Subcategory": [...]} tree (bbox_labels_600_hierarchy.json)'
        )
    h = Hierarchy()
    seen: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        mid = node.get("LabelName")
        if not isinstance(mid, str):
            raise DataError(f"{display}: a hierarchy node has no LabelName (string): keys {_keys(node)}")
        if mid != ROOT_MID and mid not in seen:
            seen.add(mid)
            h.order.append(mid)
        for key in ("Subcategory", "Part"):
            if not isinstance(node.get(key) or [], list):
                raise DataError(
                    f"{display}: {key} of {mid[:80]!r} is a {type(node[key]).__name__}, expected a list"
                )
        subs = node.get("Subcategory") or []
        for child in subs:
            cm = child.get("LabelName") if isinstance(child, dict) else None
            if not isinstance(cm, str):
                raise DataError(f"{display}: a Subcategory entry under {mid} has no LabelName")
            kids = h.children.setdefault(mid, [])
            if cm not in kids:
                kids.append(cm)
            ps = h.parents.setdefault(cm, [])
            if mid not in ps:
                ps.append(mid)
        # Parts are classes too (boxable), but not subclasses of their whole.
        parts = [p for p in (node.get("Part") or []) if isinstance(p, dict)]
        stack.extend(reversed(list(subs) + parts))
    return h


def _keys(node: dict) -> str:
    """A node's keys for a message (never its values: they may be huge or unprintable)."""
    return repr(sorted(str(k)[:40] for k in node)[:8])


def read_trainable(text: str, display: str) -> list[str]:
    """The V2 trainable MIDs: a label map ``.pbtxt`` (``item { name: ... }``) or one MID a line."""
    if "item" in text and "{" in text:
        return [c.mid for c in sorted(parse_pbtxt(text, display), key=lambda c: c.id)]
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip().split(",")[0].strip()
        if not s or s.startswith("#"):
            continue
        if not is_mid(s):
            raise DataError(
                f"{display}:{lineno}: expected one MID a line or a label map, got {line.strip()!r}"
            )
        if s not in out:
            out.append(s)
    if not out:
        raise DataError(f"{display}: no trainable classes found")
    return out


def resolve_classes(
    requested: Sequence[str],
    descriptions: ClassDescriptions | None,
    hierarchy: Hierarchy | None,
    trainable: list[str] | None,
    *,
    include_subclasses: bool = False,
    trainable_only: bool = False,
) -> list[str]:
    """Turn ``selection.classes`` into an ordered list of MIDs (the label-map order).

    Args:
        requested: display names (case-insensitive) or MIDs; empty = all boxable classes.
        descriptions: class descriptions (names and the file order).
        hierarchy: the box hierarchy, if any (needed for ``include_subclasses``).
        trainable: the V2 trainable MIDs, if any (needed for ``trainable_only``).
        include_subclasses: add every Subcategory descendant after each class.
        trainable_only: keep only trainable classes.

    Raises:
        UsageError: an unknown name (with close matches), a non-boxable or non-trainable class.
        ConfigError: an option that needs a file the config does not give.
    """
    if trainable_only and trainable is None:
        raise ConfigError(
            "selection.trainable_only needs source.trainable_classes (a MID list or a label map)"
        )
    if include_subclasses and hierarchy is None and requested:
        raise ConfigError("selection.include_subclasses needs source.hierarchy (the box hierarchy JSON)")
    names = descriptions.names if descriptions else {}
    order = descriptions.index() if descriptions else {}
    trainable_set = set(trainable or [])
    boxable = hierarchy.classes if hierarchy else None

    if not requested:
        if descriptions is not None:
            mids = list(descriptions.mids)
            if boxable is not None:
                mids = [m for m in mids if m in boxable]
        elif trainable is not None:
            mids = list(trainable)
        elif hierarchy is not None:
            mids = list(hierarchy.order)
        else:
            raise ConfigError(
                "selection.classes is empty (= all boxable classes) but the config gives no "
                "source.class_descriptions, source.hierarchy or source.trainable_classes to list them"
            )
        if trainable_only:
            mids = [m for m in mids if m in trainable_set]
        return mids

    by_name: dict[str, str] = {}
    for m in descriptions.mids if descriptions else []:
        by_name.setdefault(names[m].lower(), m)  # first in file order wins for duplicate names
    known_mids = set(names) | (boxable or set()) | trainable_set

    out: list[str] = []
    seen: set[str] = set()

    def add(m: str) -> None:
        if m not in seen:
            seen.add(m)
            out.append(m)

    for item in requested:
        key = item.strip()
        if is_mid(key):
            if known_mids and key not in known_mids:
                raise UsageError(
                    f"selection.classes: unknown MID {key!r} (not in the class descriptions or hierarchy)"
                )
            mid = key
        else:
            found = by_name.get(key.lower())
            if found is None:
                close = difflib.get_close_matches(key.lower(), list(by_name), n=5, cutoff=0.6)
                hint = (
                    "; did you mean " + ", ".join(repr(names[by_name[c]]) for c in close) + "?"
                    if close
                    else ""
                )
                where = "" if descriptions else " (no source.class_descriptions given: use MIDs)"
                raise UsageError(f"selection.classes: unknown class {item!r}{where}{hint}")
            mid = found
        if boxable is not None and mid not in boxable:
            raise UsageError(f"selection.classes: {item!r} ({mid}) is not a boxable class in the hierarchy")
        if trainable_only and mid not in trainable_set:
            raise UsageError(
                f"selection.classes: {item!r} ({mid}) is not in the trainable set (selection.trainable_only)"
            )
        add(mid)
        if include_subclasses and hierarchy is not None:
            subs = hierarchy.descendants(mid)
            subs.sort(key=lambda m: order.get(m, len(order)))
            for s in subs:
                if trainable_only and s not in trainable_set:
                    continue
                add(s)
    return out


def display_names(
    mids: Iterable[str],
    descriptions: ClassDescriptions | None,
    trainable_names: dict[str, str] | None = None,
) -> dict[str, str]:
    """Display name per MID: class descriptions first, then a trainable label map, else the MID."""
    out = {}
    for m in mids:
        if descriptions and m in descriptions.names:
            out[m] = descriptions.names[m]
        elif trainable_names and m in trainable_names:
            out[m] = trainable_names[m]
        else:
            out[m] = m
    return out


def trainable_names(text: str, display: str) -> dict[str, str]:
    """Display names from a trainable label map ``.pbtxt`` (empty for a plain MID list)."""
    if "item" in text and "{" in text:
        return {c.mid: c.name for c in parse_pbtxt(text, display)}
    return {}
