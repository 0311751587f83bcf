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
file size. Rows with the wrong number of fields are skipped by the parser and
recorded in a :class:`MalformedLog`; the value checks (numbers, ranges, IDs)
are vectorised per record batch by the callers. Line numbers are physical
lines (1-based, header included); they assume one record per line, which holds
for every Open Images CSV except image titles with quoted newlines.
"""

from __future__ import annotations

import csv
import io
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from openimages_od.errors import DataError

__all__ = [
    "Layout",
    "BOX_LAYOUTS",
    "IMAGE_INDEX_LAYOUTS",
    "IMAGE_LABEL_LAYOUTS",
    "ATTRIBUTE_COLUMNS",
    "MalformedLog",
    "CsvStream",
    "detect_layout",
    "read_header",
    "parse_floats",
    "is_image_id",
]

BOX_BASE = ("ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax")
ATTRIBUTE_COLUMNS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
XCLICK_COLUMNS = tuple(f"XClick{i}X" for i in range(1, 5)) + tuple(f"XClick{i}Y" for i in range(1, 5))
INDEX_BASE = (
    "ImageID", "Subset", "OriginalURL", "OriginalLandingURL", "License", "AuthorProfileURL",
    "Author", "Title", "OriginalSize", "OriginalMD5", "Thumbnail300KURL",
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
_FLOAT_RE = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


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
    first: Optional[tuple[int, str]] = None  # (line, message) of the earliest row recorded

    def batch_log(self) -> "MalformedLog":
        """Where one batch's checks record: self, or in strict mode a scratch log so the
        earliest bad row of the batch (not the first reason checked) is the one reported."""
        return MalformedLog(strict=False, max_examples=1) if self.strict else self

    def end_batch(self, scratch: "MalformedLog") -> None:
        if scratch is not self and scratch.counts:
            raise DataError(scratch.first[1] if scratch.first else next(iter(scratch.examples.values()))[0])

    def add(self, reason: str, display: str, line: Optional[int], detail: str, count: int = 1) -> None:
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

    def merge(self, other: "MalformedLog") -> None:
        for r, n in other.counts.items():
            self.counts[r] = self.counts.get(r, 0) + n
            ex = self.examples.setdefault(r, [])
            ex.extend(other.examples.get(r, [])[: max(0, self.max_examples - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {r: {"count": self.counts[r], "examples": self.examples.get(r, [])} for r in sorted(self.counts)}


# --------------------------------------------------------------------------- streaming reader


class _LineLocator:
    """Finds the physical line of rows the parser skipped, from their text.

    pyarrow's streaming reader reports skipped rows without a row number, in file
    order, so each is searched forward from the previous one. After ``limit``
    rows the search stops (line numbers of later rows become approximate).
    """

    def __init__(self, path: Path, limit: int = 10000) -> None:
        self._fh = open(path, "rb")
        size = Path(path).stat().st_size
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._pos = 0
        self._line = 1  # line number at self._pos
        self.limit = limit
        self.located = 0

    def locate(self, text: str) -> Optional[int]:
        if self._mm is None or self.located >= self.limit:
            return None
        needle = text.encode()
        mm, n = self._mm, len(self._mm)
        i = self._pos
        while True:
            i = mm.find(needle, i)
            if i < 0:
                return None
            starts = i == 0 or mm[i - 1:i] == b"\n"
            j = i + len(needle)
            ends = j >= n or mm[j:j + 1] in (b"\n", b"\r")
            if starts and ends:
                break
            i += 1
        self._line += mm[self._pos:i].count(b"\n")
        self._pos = i
        self.located += 1
        return self._line

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._fh.close()


class CsvStream:
    """Stream record batches of selected columns (all as strings) from a local CSV.

    Rows with too few or too many fields are skipped and recorded in ``log``
    (``missing_fields`` / ``extra_fields``). For each batch, :meth:`line_of`
    turns a row's global index among kept rows into its physical line.

    Args:
        path: local file.
        layout: from :func:`detect_layout`.
        columns: the columns to read (others are not converted at all).
        display: the file name for messages.
        log: where malformed rows are recorded.
        block_size: parser block; larger is faster, memory is a few blocks.
        newlines_in_values: allow quoted newlines (image titles).
    """

    def __init__(
        self,
        path: Path,
        layout: Layout,
        columns: Sequence[str],
        display: str,
        log: MalformedLog,
        block_size: int = 16 << 20,
        newlines_in_values: bool = False,
    ) -> None:
        self.path, self.layout, self.columns, self.display, self.log = path, layout, list(columns), display, log
        self.block_size = block_size
        self.newlines_in_values = newlines_in_values
        self.header_lines = 1 if layout.has_header else 0
        self._skipped: list[int] = []  # physical lines of skipped rows, ascending
        self._pending: list[tuple[str, Optional[int], str]] = []
        self._locator = _LineLocator(path)
        self.rows_read = 0

    def _on_invalid(self, row: "pacsv.InvalidRow") -> str:
        line = self._locator.locate(row.text)
        if line is not None:
            self._skipped.append(line)
        reason = "missing_fields" if row.actual_columns < row.expected_columns else "extra_fields"
        detail = f"{row.actual_columns} fields, expected {row.expected_columns}: {row.text[:120]!r}"
        self._pending.append((reason, line, detail))
        return "skip"

    def line_of(self, g: int) -> int:
        """Physical line of the kept row with global index ``g`` (0-based)."""
        p = self.header_lines + g + 1
        for s in self._skipped:
            if s <= p:
                p += 1
            else:
                break
        return p

    def _flush_pending(self, upto_line: Optional[int]) -> None:
        keep = []
        for reason, line, detail in self._pending:
            if upto_line is None or line is None or line <= upto_line:
                self.log.add(reason, self.display, line, detail)
            else:
                keep.append((reason, line, detail))
        self._pending = keep

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield ``(batch, g0)``: a batch and the global kept-row index of its first row."""
        read = pacsv.ReadOptions(
            column_names=list(self.layout.columns),
            skip_rows=self.header_lines,
            block_size=self.block_size,
            encoding="utf8",
        )
        parse = pacsv.ParseOptions(
            invalid_row_handler=self._on_invalid,
            newlines_in_values=self.newlines_in_values,
            ignore_empty_lines=False,  # a blank line is a malformed row, and keeps line numbers exact
        )
        conv = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in self.columns},
            include_columns=self.columns,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        g0 = 0
        try:
            reader = pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=conv)
            for batch in reader:
                n = batch.num_rows
                if n == 0:
                    continue
                # Skipped rows reported so far that precede this batch's last row belong before it.
                self._flush_pending(self.line_of(g0 + n - 1))
                yield batch, g0
                g0 += n
                self.rows_read = g0
            self._flush_pending(None)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{self.display}: cannot parse CSV ({exc})") from None
        finally:
            self._locator.close()


# --------------------------------------------------------------------------- value parsing


def parse_floats(col: pa.Array, empty_value: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a string column into float64.

    Returns:
        ``(values, empty, non_numeric)``: values (0 where invalid, ``empty_value``
        where empty if given), and boolean masks of empty and non-numeric cells.
    """
    n = len(col)
    try:
        vals = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        return vals, np.zeros(n, bool), np.zeros(n, bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    trimmed = pc.utf8_trim_whitespace(col)
    empty = pc.equal(pc.utf8_length(trimmed), 0).to_numpy(zero_copy_only=False)
    numeric = pc.match_substring_regex(trimmed, _FLOAT_RE).to_numpy(zero_copy_only=False)
    ok = pa.array(numeric)
    vals = pc.cast(pc.if_else(ok, trimmed, pa.scalar("0")), pa.float64()).to_numpy(zero_copy_only=False).copy()
    bad = ~numeric & ~empty
    if empty_value is not None:
        vals[empty] = empty_value
    return vals, empty, bad
