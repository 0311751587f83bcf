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
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from openimages_od.errors import DataError

__all__ = ["LabelClass", "LabelMap", "parse_pbtxt", "format_pbtxt", "format_csv"]


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
    def from_mids(cls, mids: Iterable[str], names: dict[str, str]) -> "LabelMap":
        """ids 1..N in the given order; display names from ``names`` (MID when unknown)."""
        return cls([LabelClass(i, m, names.get(m, m)) for i, m in enumerate(mids, start=1)])

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):  # noqa: ANN204
        return iter(self.classes)

    def to_pbtxt(self) -> str:
        return format_pbtxt(self.classes)

    def to_csv(self) -> str:
        return format_csv(self.classes)

    def to_json(self) -> list[dict]:
        return [{"id": c.id, "mid": c.mid, "name": c.name} for c in self.classes]

    @classmethod
    def from_pbtxt(cls, text: str, source: str = "label_map.pbtxt") -> "LabelMap":
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
