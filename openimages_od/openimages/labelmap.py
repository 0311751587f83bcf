"""Label maps: the Object Detection ``StringIntLabelMap`` text format and Model Garden's CSV.

``label_map.pbtxt``::

    item {
      name: "/m/0k4j"
      id: 1
      display_name: "Car"
    }

ids start at 1 (0 is background for the detector) and follow the order the
plan documents (the order classes were selected; for "all classes", the
order of the class-descriptions file). ``label_map.csv`` is ``id,name`` with
the display name, as Model Garden's label-map decoder expects.

Ids are stable across re-plans (:func:`assign_ids`): a class keeps the id it
had in the output's previous label map, new classes are appended after the
highest id ever used, and a removed class's id is retired (recorded, never
given to another class). ``selection.label_map`` pins ids from a given
``.pbtxt`` instead. So ids may have gaps; the detector needs
:attr:`LabelMap.num_classes` outputs (highest id + 1 for background).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from openimages_od.errors import DataError

__all__ = ["LabelClass", "LabelMap", "assign_ids", "format_csv", "format_pbtxt", "parse_pbtxt"]


@dataclass(frozen=True)
class LabelClass:
    id: int
    mid: str
    name: str


class LabelMap:
    """An ordered list of classes with ids 1..N."""

    def __init__(self, classes: Sequence[LabelClass]) -> None:
        ids = [c.id for c in classes]
        if len(set(ids)) != len(ids):
            raise DataError("label map has duplicate ids")
        mids = [c.mid for c in classes]
        if len(set(mids)) != len(mids):
            raise DataError("label map has duplicate names (MIDs)")
        if any(i < 1 for i in ids):
            raise DataError("label map ids must start at 1 (0 is background)")
        self.classes = sorted(classes, key=lambda c: c.id)
        self.by_mid = {c.mid: c for c in self.classes}
        self.by_id = {c.id: c for c in self.classes}

    @classmethod
    def from_mids(cls, mids: Iterable[str], names: dict[str, str]) -> LabelMap:
        """ids 1..N in the given order; display names from ``names`` (MID when unknown)."""
        return cls([LabelClass(i, m, names.get(m, m)) for i, m in enumerate(mids, start=1)])

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def num_classes(self) -> int:
        """Detector outputs: the highest id + 1 (id 0 is background; retired ids leave gaps)."""
        return max((c.id for c in self.classes), default=0) + 1

    @property
    def digest(self) -> str:
        """sha256 of the pbtxt text: what shards, plans and models name to say which ids they use."""
        import hashlib

        return hashlib.sha256(self.to_pbtxt().encode()).hexdigest()

    def __iter__(self):
        return iter(self.classes)

    def to_pbtxt(self) -> str:
        return format_pbtxt(self.classes)

    def to_csv(self) -> str:
        return format_csv(self.classes)

    def to_json(self) -> list[dict]:
        return [{"id": c.id, "mid": c.mid, "name": c.name} for c in self.classes]

    @classmethod
    def from_pbtxt(cls, text: str, source: str = "label_map.pbtxt") -> LabelMap:
        return cls(parse_pbtxt(text, source))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pbtxt(classes: Iterable[LabelClass]) -> str:
    out = []
    for c in classes:
        out.append(f"item {{\n  name: {_quote(c.mid)}\n  id: {c.id}\n  display_name: {_quote(c.name)}\n}}\n")
    return "".join(out)


def format_csv(classes: Iterable[LabelClass]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for c in classes:
        w.writerow([c.id, c.name])
    return buf.getvalue()


_ITEM_RE = re.compile(r"item\s*\{(.*?)\}", re.S)
_FIELD_RE = re.compile(r'(\w+)\s*:\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[-\w./]+)')


def parse_pbtxt(text: str, source: str = "label_map.pbtxt") -> list[LabelClass]:
    """Parse a StringIntLabelMap text file (``name``/``id``/``display_name``; ``display_name`` optional)."""
    items = []
    for n, m in enumerate(_ITEM_RE.finditer(text), start=1):
        fields: dict[str, str] = {}
        for k, v in _FIELD_RE.findall(m.group(1)):
            if v[:1] in "\"'":
                v = v[1:-1].encode().decode("unicode_escape") if "\\" in v else v[1:-1]
            fields[k] = v
        line = text.count("\n", 0, m.start()) + 1
        if "name" not in fields or "id" not in fields:
            raise DataError(f"{source}:{line}: item {n} needs both name and id")
        try:
            iid = int(fields["id"])
        except ValueError:
            raise DataError(f"{source}:{line}: item {n} id {fields['id']!r} is not an integer") from None
        items.append(LabelClass(iid, fields["name"], fields.get("display_name", fields["name"])))
    if not items:
        raise DataError(f"{source}: no 'item {{ ... }}' entries found")
    return items


def assign_ids(
    mids: Sequence[str],
    names: dict[str, str],
    *,
    previous: LabelMap | None = None,
    retired: Iterable[dict] = (),
    pinned: LabelMap | None = None,
    pinned_source: str = "selection.label_map",
    extra: Sequence[str] = (),
) -> tuple[LabelMap, list[dict]]:
    """Ids for the selected classes ``mids`` (in selection order).

    Args:
        mids: selected MIDs in label-map order.
        names: display names by MID.
        previous: the output's existing label map (its classes keep their ids).
        retired: classes removed by earlier plans (``{"id", "mid", "name"}``); their ids are
            never given to another class, and a retired class that comes back gets its id back.
        pinned: a label map whose ids win (``selection.label_map``); every selected class must be in it.
        pinned_source: where ``pinned`` came from, for error messages.
        extra: more MIDs after ``mids`` (``selection.keep_all_labels``: other classes found on the
            chosen images). They follow the same rules, except that with ``pinned`` one missing
            there is appended after the highest id used (pinned or retired) instead of an error.
            New ids are given in list order, so appending to ``extra`` never changes the ids
            given before.

    Returns:
        (label map, retired classes after this plan: the earlier ones plus those removed now).

    Raises:
        DataError: a selected class is missing from the pinned label map.
    """
    retired_by_mid = {r["mid"]: dict(r) for r in retired}
    if pinned is not None:
        missing = [m for m in mids if m not in pinned.by_mid]
        if missing:
            shown = ", ".join(f"{m} ({names.get(m, m)})" for m in missing[:5])
            raise DataError(
                f"{pinned_source}: {len(missing)} selected class(es) have no id there: {shown}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        classes = [LabelClass(pinned.by_mid[m].id, m, names.get(m) or pinned.by_mid[m].name) for m in mids]
        next_id = max([c.id for c in pinned] + [int(r["id"]) for r in retired_by_mid.values()], default=0) + 1
        for m in extra:
            if m in pinned.by_mid:
                classes.append(LabelClass(pinned.by_mid[m].id, m, names.get(m) or pinned.by_mid[m].name))
            else:
                classes.append(LabelClass(next_id, m, names.get(m, m)))
                next_id += 1
    else:
        used = {c.id for c in previous} if previous is not None else set()
        used |= {int(r["id"]) for r in retired_by_mid.values()}
        next_id = max(used, default=0) + 1
        classes = []
        for m in [*mids, *extra]:
            if previous is not None and m in previous.by_mid:
                cid = previous.by_mid[m].id
            elif m in retired_by_mid:
                cid = int(retired_by_mid[m]["id"])
            else:
                cid, next_id = next_id, next_id + 1
            classes.append(LabelClass(cid, m, names.get(m, m)))
    lm = LabelMap(classes)
    for m in lm.by_mid:
        retired_by_mid.pop(m, None)
    if previous is not None:
        for c in previous:
            if c.mid not in lm.by_mid and c.id not in lm.by_id:
                retired_by_mid.setdefault(c.mid, {"id": c.id, "mid": c.mid, "name": c.name})
    return lm, sorted(retired_by_mid.values(), key=lambda r: int(r["id"]))
