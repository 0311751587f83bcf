"""Open Images CSV layouts per release, and a streaming, validating CSV reader.

Every release spells its files a little differently; the reader detects the
layout from the header (or, for headerless files, from the column count) and
fails clearly on anything it does not know, naming the file and the header seen.

Box annotations (``*-annotations-bbox.csv``):

* ``v2-train`` (8 columns): ``ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax``
* ``v4`` (13 columns; V2 validation/test, V3, V4, V5, V6 validation/test):
  + ``IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside``
* ``v6-train`` (21 columns; V6/V7 train): + ``XClick1X..XClick4X,XClick1Y..XClick4Y``

Image index: ``v2`` (11 columns, no ``Rotation``) and ``v4`` (+ ``Rotation``).
Image-level labels: ``ImageID,Source,LabelName,Confidence``.
``ImageId`` (the V7 point-label spelling) is accepted as ``ImageID`` everywhere.

Parsing is streaming (``pyarrow.csv.open_csv``) so memory stays bounded at any
file size (:class:`~.csvstream.CsvStream`). :func:`~.fastcsv.select_rows_fast` is a faster path for well-formed unquoted
ID/label CSVs (polars, parallel, filtering before conversion); it steps aside
for anything structurally odd, which this reader then reports. Rows with the wrong number of fields are skipped by the parser and
recorded in a :class:`MalformedLog`; the value checks (numbers, ranges, IDs)
are vectorised per record batch by the callers. Line numbers are physical
lines (1-based, header included); they assume one record per line, which holds
for every Open Images CSV except image titles with quoted newlines.

A stray quote makes a CSV parser read everything up to the next quote (often
the end of the file) as one field, so thousands of rows can vanish into one
"malformed row". The readers prevent or refuse that:

* Box and label CSVs hold only IDs and numbers. When their first line has no
  quote (every Open Images release), quoting is off: a stray ``"`` is an
  ordinary character, so it spoils only its own row, which the value checks
  report as malformed with its exact ``file:line``. This is also the fastest
  way to parse.
* When their first line is quoted (a re-export with quoted fields), quoting is
  on, and a row that spans lines is refused with a :class:`DataError` naming
  ``file:line`` of the quote: seen by the parser as a malformed row, or found
  at the end by counting records against physical lines.
* In the image index (titles may hold quoted newlines), a field with a newline
  followed by what looks like the start of another record
  (``\\n<16 hex digits>,``) is refused the same way: in a malformed row at
  once; in rows that parsed, by a second pass over every column, made only
  when the file has fewer records than lines (a file without multi-line
  fields costs one line count).

These refusals hold whatever ``selection.strict`` says: the rest of the file
would be misread.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from openimages_od.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "BOX_LAYOUTS",
    "IMAGE_INDEX_LAYOUTS",
    "IMAGE_LABEL_LAYOUTS",
    "Layout",
    "MalformedLog",
    "detect_layout",
    "is_image_id",
    "read_header",
]

BOX_BASE = ("ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax")
ATTRIBUTE_COLUMNS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
XCLICK_COLUMNS = tuple(f"XClick{i}X" for i in range(1, 5)) + tuple(f"XClick{i}Y" for i in range(1, 5))
INDEX_BASE = (
    "ImageID",
    "Subset",
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "OriginalSize",
    "OriginalMD5",
    "Thumbnail300KURL",
)

BOX_LAYOUTS: dict[str, tuple[str, ...]] = {
    "v2-train": BOX_BASE,
    "v4": BOX_BASE + ATTRIBUTE_COLUMNS,
    "v6-train": BOX_BASE + ATTRIBUTE_COLUMNS + XCLICK_COLUMNS,
}
IMAGE_INDEX_LAYOUTS: dict[str, tuple[str, ...]] = {
    "v2": INDEX_BASE,
    "v4": INDEX_BASE + ("Rotation",),
}
IMAGE_LABEL_LAYOUTS: dict[str, tuple[str, ...]] = {
    "v2": ("ImageID", "Source", "LabelName", "Confidence"),
}

_ALIASES = {"imageid": "ImageID"}  # V7 point labels spell it ImageId
_IMAGE_ID_RE = re.compile(r"^[0-9a-fA-F]{16}$")


@dataclass(frozen=True)
class Layout:
    """A detected file layout: which release spelling, its columns, whether line 1 is a header."""

    kind: str
    name: str
    columns: tuple[str, ...]
    has_header: bool


def read_header(path: Path, max_bytes: int = 1 << 16) -> list[str]:
    """The first CSV record of a local file (BOM and surrounding spaces stripped)."""
    with open(path, "rb") as fh:
        head = fh.read(max_bytes)
    text = head.decode("utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text else ""
    row = next(csv.reader(io.StringIO(first)), [])
    return [c.strip() for c in row]


def _normalize(col: str) -> str:
    return _ALIASES.get(col.lower(), col)


def detect_layout(path: Path, kind: str, display: str) -> Layout:
    """Detect the layout of a box, image-index or image-label CSV.

    Args:
        path: local file.
        kind: ``boxes``, ``images`` or ``image_labels``.
        display: the name to use in messages (the configured URL).

    Raises:
        DataError: the file is empty or its header/column count matches no known layout.
    """
    layouts = {"boxes": BOX_LAYOUTS, "images": IMAGE_INDEX_LAYOUTS, "image_labels": IMAGE_LABEL_LAYOUTS}[kind]
    header = read_header(path)
    if not header or header == [""]:
        raise DataError(f"{display}: empty file (expected an Open Images {kind} CSV)")
    norm = tuple(_normalize(c) for c in header)
    by_lower = {tuple(c.lower() for c in cols): (name, cols) for name, cols in layouts.items()}
    hit = by_lower.get(tuple(c.lower() for c in norm))
    if hit:
        return Layout(kind, hit[0], hit[1], True)
    if is_image_id(header[0]):
        # A headerless file: only the column count tells the layout apart.
        for name, cols in layouts.items():
            if len(cols) == len(header):
                return Layout(kind, name, cols, False)
    expected = "; ".join(f"{n} ({len(c)} columns: {','.join(c)})" for n, c in layouts.items())
    raise DataError(
        f"{display}: unknown {kind} layout: header {','.join(header)!r} ({len(header)} columns); "
        f"expected one of: {expected}"
    )


def is_image_id(s: str) -> bool:
    """True for a 16-hex-digit Open Images ImageID."""
    return bool(_IMAGE_ID_RE.match(s))


# --------------------------------------------------------------------------- malformed rows


@dataclass
class MalformedLog:
    """Counts malformed rows by reason, keeping the first few ``file:line: detail`` examples.

    With ``strict`` the first recorded row raises :class:`DataError` instead.
    """

    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    first: tuple[int, str] | None = None  # (line, message) of the earliest row recorded

    def batch_log(self) -> MalformedLog:
        """Where one batch's checks record: self, or in strict mode a scratch log so the
        earliest bad row of the batch (not the first reason checked) is the one reported."""
        return MalformedLog(strict=False, max_examples=1) if self.strict else self

    def end_batch(self, scratch: MalformedLog) -> None:
        if scratch is not self and scratch.counts:
            raise DataError(scratch.first[1] if scratch.first else next(iter(scratch.examples.values()))[0])

    def add(self, reason: str, display: str, line: int | None, detail: str, count: int = 1) -> None:
        where = f"{display}:{line if line is not None else '?'}"
        if self.strict:
            raise DataError(f"{where}: malformed row ({reason}): {detail}")
        if line is not None and (self.first is None or line < self.first[0]):
            self.first = (line, f"{where}: malformed row ({reason}): {detail}")
        self.counts[reason] = self.counts.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {detail}")

    def wants_examples(self, reason: str) -> bool:
        return self.strict or len(self.examples.get(reason, [])) < self.max_examples

    def merge(self, other: MalformedLog) -> None:
        for r, n in other.counts.items():
            self.counts[r] = self.counts.get(r, 0) + n
            ex = self.examples.setdefault(r, [])
            ex.extend(other.examples.get(r, [])[: max(0, self.max_examples - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {
            r: {"count": self.counts[r], "examples": self.examples.get(r, [])} for r in sorted(self.counts)
        }


# --------------------------------------------------------------------------- streaming reader
