"""Open Images CSV layouts per release, and a streaming, validating CSV reader.

(Over 400 lines: the exact reader and its polars fast path share one set of structural rules; moving
the fast path to its own module is the next split.)

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
file size. :func:`select_rows_fast` is a faster path for well-formed unquoted
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
import mmap
import re
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from openimages_od.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "BOX_LAYOUTS",
    "IMAGE_INDEX_LAYOUTS",
    "IMAGE_LABEL_LAYOUTS",
    "CsvStream",
    "FastPathUnavailable",
    "Layout",
    "MalformedLog",
    "RowLines",
    "count_lines",
    "count_lines_and_commas",
    "detect_layout",
    "duplicate_rows",
    "is_image_id",
    "iter_rows_fast",
    "parse_byte_counts",
    "parse_floats",
    "read_header",
    "select_rows_fast",
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
_FLOAT_RE = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
# Inside one field: a line break then the start of an Open Images record (ImageID is
# the first column of every layout): rows swallowed by an unbalanced quote.
_SWALLOWED_RE = r"\n[0-9a-fA-F]{16},"
_SWALLOWED_PY = re.compile(_SWALLOWED_RE)


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

    def locate(self, text: str) -> int | None:
        if self._mm is None or self.located >= self.limit:
            return None
        needle = text.encode()
        mm, n = self._mm, len(self._mm)
        i = self._pos
        while True:
            i = mm.find(needle, i)
            if i < 0:
                return None
            starts = i == 0 or mm[i - 1 : i] == b"\n"
            j = i + len(needle)
            ends = j >= n or mm[j : j + 1] in (b"\n", b"\r")
            if starts and ends:
                break
            i += 1
        self._line += mm[self._pos : i].count(b"\n")
        self._pos = i
        self.located += 1
        return self._line

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._fh.close()


def count_lines(path: Path) -> int:
    """Physical lines of a file (a last line without a newline counts)."""
    return count_lines_and_commas(path)[0]


def count_lines_and_commas(path: Path, chunk: int = 8 << 20) -> tuple[int, int]:
    """``(physical lines, commas)`` of a file, in one read (a last line without a newline counts).

    Reads into one reused buffer and counts with numpy: ``bytes.count`` scans a byte at a
    time and a fresh buffer per read page-faults, which made a line count a second of CPU on
    a 2 GB file, run beside the parser on the same cores.
    """
    buf = bytearray(chunk)
    arr = np.frombuffer(buf, np.uint8)
    eq = np.empty(chunk, bool)
    lines = commas = 0
    last = 10  # b"\n": an empty file has no lines
    with open(path, "rb", buffering=0) as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            np.equal(arr[:k], 10, out=eq[:k])
            lines += int(np.count_nonzero(eq[:k]))
            np.equal(arr[:k], 44, out=eq[:k])
            commas += int(np.count_nonzero(eq[:k]))
            last = int(arr[k - 1])
    return lines + (0 if last == 10 else 1), commas


def _first_line_quoted(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b'"' in fh.readline(1 << 16)


def _open_quote_line(path: Path, after_line: int = 0) -> int | None:
    """The first line (after ``after_line``) with an odd number of quotes: where a field that
    runs over several lines opens."""
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, start=1):
            if i > after_line and line.count(b'"') % 2 == 1:
                return i
    return None


def _needle(text: str) -> str:
    """What to search for to find a multi-line field: its first two lines (unique enough), at most 300 chars."""
    first = text.find("\n")
    second = text.find("\n", first + 1) if first >= 0 else -1
    return text[: second if second > 0 else len(text)][:300]


def _line_of_text(path: Path, text: str) -> int | None:
    """The physical line where ``text`` (a field's first line) first occurs."""
    needle = text.encode()
    if not needle:
        return None
    with open(path, "rb") as fh:
        size = Path(path).stat().st_size
        if not size:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            i = mm.find(needle)
            if i < 0:
                return None
            line = 1
            pos = 0
            while True:
                j = mm.find(b"\n", pos, i)
                if j < 0:
                    return line
                line += 1
                pos = j + 1


class CsvStream:
    """Stream record batches of selected columns (all as strings) from a local CSV.

    Rows with too few or too many fields are skipped and recorded in ``log``
    (``missing_fields`` / ``extra_fields``). For each batch, :meth:`line_of`
    turns a row's global index among kept rows into its physical line. A
    stray quote that swallows rows raises :class:`DataError` (see the module
    docstring), as does a file that is not UTF-8.

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
        self.path, self.layout, self.columns, self.display, self.log = (
            path,
            layout,
            list(columns),
            display,
            log,
        )
        self.block_size = block_size
        self.newlines_in_values = newlines_in_values
        self.header_lines = 1 if layout.has_header else 0
        self._skipped: list[int] = []  # physical lines of skipped rows, ascending
        self._pending: list[tuple[str, int | None, str]] = []
        self._locator = _LineLocator(path)
        self.rows_read = 0
        self.rows_skipped = 0
        self._swallow: str | None = None  # message of the first swallowing row seen
        # Quoting only where the file uses it (see the module docstring).
        self.quoting = newlines_in_values or _first_line_quoted(path)

    def _swallows(self, text: str) -> bool:
        if "\n" not in text:
            return False
        return not self.newlines_in_values or bool(_SWALLOWED_PY.search(text))

    def _swallow_message(self, line: int | None, text: str) -> str:
        spans = text.count("\n") + 1
        return (
            f"{self.display}:{line if line is not None else '?'}: a quote opens a field that runs over "
            f"{spans} lines (a stray '\"'?), swallowing the rows after it: {text[:80]!r}...; "
            "fix or remove the quote"
        )

    def _on_invalid(self, row: pacsv.InvalidRow) -> str:
        self.rows_skipped += 1
        if self._swallow is None and self._swallows(row.text):
            self._swallow = self._swallow_message(_line_of_text(self.path, _needle(row.text)), row.text)
            return "skip"
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

    def _flush_pending(self, upto_line: int | None) -> None:
        keep: list[tuple[str, int | None, str]] = []
        for reason, line, detail in self._pending:
            if upto_line is None or line is None or line <= upto_line:
                self.log.add(reason, self.display, line, detail)
            else:
                keep.append((reason, line, detail))
        self._pending = keep

    def _header_only(self) -> bool:
        """A header without a newline and nothing else (pyarrow cannot skip such a header)."""
        if not self.header_lines:
            return False
        with open(self.path, "rb") as fh:
            head = fh.read(1 << 16)
            more = fh.read(1)
        return not more and b"\n" not in head.rstrip(b"\r\n")

    def _check_swallowed(self, batch: pa.RecordBatch, g0: int) -> None:
        """Raise if a field of ``batch`` holds other records (image index: quoted newlines allowed)."""
        for col in batch.columns:
            nl = pc.match_substring(col, "\n")
            if not pc.any(nl).as_py():
                continue
            hit = pc.match_substring_regex(col, _SWALLOWED_RE)
            if pc.any(hit).as_py():
                i = int(np.flatnonzero(hit.to_numpy(zero_copy_only=False))[0])
                text = col[i].as_py()
                line = _line_of_text(self.path, _needle(text)) or self.line_of(g0 + i)
                raise DataError(self._swallow_message(line, text))

    def _check_line_count(self) -> None:
        """Records parsed against physical lines: where fields cannot hold newlines (quoted box and
        label files) they must match; where they can (the image index), fewer records than lines
        triggers a second pass over every column that looks for fields holding other records."""
        if not self.quoting:
            return
        physical = count_lines(self.path)
        records = self.header_lines + self.rows_read + self.rows_skipped
        if records < physical and self.newlines_in_values:
            self._rescan_every_column()
            return
        if records < physical:
            line = _open_quote_line(self.path)
            raise DataError(
                f"{self.display}:{line if line is not None else '?'}: a quote opens a field that runs over "
                f"several lines (a stray '\"'?): {physical - records} line(s) were swallowed into other rows "
                f"({records} records in {physical} lines); fix or remove the quote"
            )

    def _options(self, include: list[str], handler: Any) -> tuple[Any, Any, Any]:
        read = pacsv.ReadOptions(
            column_names=list(self.layout.columns),
            skip_rows=self.header_lines,
            block_size=self.block_size,
            encoding="utf8",
        )
        parse = pacsv.ParseOptions(
            quote_char='"' if self.quoting else False,
            invalid_row_handler=handler,
            newlines_in_values=self.newlines_in_values,
            ignore_empty_lines=False,  # a blank line is a malformed row, and keeps line numbers exact
        )
        conv = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in include},
            include_columns=include,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        return read, parse, conv

    def _rescan_every_column(self) -> None:
        """Second pass (only for files with multi-line fields): every column, looking for records inside fields."""
        read, parse, conv = self._options(list(self.layout.columns), lambda row: "skip")
        g0 = 0
        for batch in pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=conv):
            self._check_swallowed(batch, g0)
            g0 += batch.num_rows

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield ``(batch, g0)``: a batch and the global kept-row index of its first row.

        Raises:
            DataError: a stray quote swallowed rows, or the file cannot be parsed.
        """
        if self._header_only():
            self._locator.close()
            return
        read, parse, conv = self._options(self.columns, self._on_invalid)
        g0 = 0
        try:
            reader = pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=conv)
            for batch in reader:
                n = batch.num_rows
                if self._swallow is not None:
                    raise DataError(self._swallow)
                if n == 0:
                    continue
                # Skipped rows reported so far that precede this batch's last row belong before it.
                self._flush_pending(self.line_of(g0 + n - 1))
                yield batch, g0
                g0 += n
                self.rows_read = g0
            if self._swallow is not None:
                raise DataError(self._swallow)
            self._check_line_count()
            self._flush_pending(None)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{self.display}: cannot parse CSV ({exc})") from None
        finally:
            self._locator.close()


# --------------------------------------------------------------------------- fast path (polars)


class RowLines:
    """A row subset's line lookup, standing in for :meth:`CsvStream.line_of` in the value checks.

    Args:
        display: the file name for messages.
        lines: physical line (1-based) of each row of the subset.
    """

    def __init__(self, display: str, lines: np.ndarray) -> None:
        self.display = display
        self.lines = lines

    def line_of(self, g: int) -> int:
        return int(self.lines[g])


class FastPathUnavailable(Exception):
    """Raised by :func:`iter_rows_fast`: the file is not one it reads exactly; use :class:`CsvStream`."""


def iter_rows_fast(
    path: Path,
    layout: Layout,
    columns: Sequence[str],
    display: str,
    keep: Sequence[str],
    known: Sequence[str] | None,
    group_batches: int = 64,
    strict: bool = False,
) -> Generator[tuple[pa.RecordBatch, RowLines], None, int]:
    """The rows a plan looks at, from a well-formed unquoted ID/label CSV, with polars' streaming engine.

    A plan validates only rows of kept classes (plus every row's class against
    ``known`` and its ImageID against blank), so the other ~94% of a box file
    need not be converted at all: polars scans the file on every core and keeps
    rows whose ``LabelName`` is kept or unknown, or whose ``ImageID`` is empty.
    They come in file order, in groups of ``group_batches`` polars batches, each
    with a :class:`RowLines` giving its rows' physical lines; the caller runs the
    same value checks as on a :class:`CsvStream` batch. The generator's return
    value is the number of rows in the file.

    This is only a fast path. It raises :class:`FastPathUnavailable` (and the
    caller streams the file with :class:`CsvStream`, which reports structural
    problems row by row) when polars is missing, when the first line is quoted,
    or when the file is not plainly well-formed: a row with fewer fields or a blank
    line (its last column is missing: seen in the group that holds it), a row with
    more fields (the file's commas, counted on a thread while polars parses, are not
    ``columns - 1`` per line: known at the end), invalid UTF-8 in a column read.
    polars reads only the columns needed (the last one included, for short rows),
    which is why extra fields are found by counting; the caller keeps its findings
    aside until the generator returns. In ``strict`` mode it steps aside at once:
    which bad row stops the run is the exact reader's call (a group could otherwise
    be checked before damage later in the file is known). Without quoting every
    record is one physical line, so lines are exact.

    Args:
        path: local file.
        layout: from :func:`detect_layout` (``boxes`` or ``image_labels``).
        columns: columns to return (as strings, empty fields as ``""``).
        display: the file name for messages.
        keep: labels whose rows are returned.
        known: all known labels (rows of other labels are returned too), or None.
        group_batches: polars batches per group (memory: one group plus the caller's results).
        strict: step aside (see above).

    Raises:
        FastPathUnavailable: see above.
    """
    if strict:
        raise FastPathUnavailable("strict mode")
    if _first_line_quoted(path):
        raise FastPathUnavailable("quoted file")
    try:
        import polars as pl
    except ImportError:  # optional speed-up: the streaming pyarrow reader does the same work
        raise FastPathUnavailable("polars is not installed") from None
    last = layout.columns[-1]
    header = 1 if layout.has_header else 0
    schema = {c: pl.String for c in layout.columns}
    label = pl.col("LabelName")
    if known is None:
        want = label.is_in(list(keep))
    else:
        # Kept or unknown is "not one of the other known classes": one lookup per row, not two.
        keep_set = set(keep)
        want = ~label.is_in([m for m in known if m not in keep_set]) | label.is_null()
    want = want | pl.col("ImageID").is_null() | pl.col(last).is_null()
    needed = set(columns) | {"ImageID", "LabelName", last}
    scan = pl.scan_csv(
        path,
        has_header=False,
        skip_rows=header,
        schema=schema,
        quote_char=None,
        row_index_name="__row",
        raise_if_empty=False,
    ).select(["__row"] + [c for c in layout.columns if c in needed])
    n_fields = len(layout.columns)

    def check_fields(counted: tuple[int, int]) -> int:
        # Every line has at least n_fields fields (a shorter one would have made us step aside),
        # so n_fields - 1 commas per line on the whole means none has more.
        lines, commas = counted
        if commas != lines * (n_fields - 1):
            raise FastPathUnavailable("a row with extra fields")
        return lines - header

    def group(frames: list[Any]) -> tuple[pa.RecordBatch, RowLines]:
        df = pl.concat(frames)
        lines = df.get_column("__row").to_numpy().astype(np.int64) + header + 1
        table = df.select([pl.col(c).fill_null("") for c in columns]).to_arrow()
        # Compact copies: polars' filtered string views would keep whole parsed blocks alive.
        arrays = [table.column(c).combine_chunks().cast(pa.string()) for c in columns]
        return pa.RecordBatch.from_arrays(arrays, names=list(columns)), RowLines(display, lines)

    # Every record is one line here (no quoting; a blank line makes us step aside), so the
    # row count is the line count: counted with the commas on a thread while polars parses
    # (polars' own count would memory-map the file, and those pages are RSS).
    with ThreadPoolExecutor(max_workers=1) as pool:
        counted = pool.submit(count_lines_and_commas, path)
        pending: list[Any] = []
        batches = scan.filter(want).collect_batches()
        while True:
            try:
                df = next(batches, None)
            except Exception as exc:
                log.debug("%s: polars fast path not taken (%s)", display, exc)
                raise FastPathUnavailable(str(exc)) from None
            if df is not None and df.height:
                if df.get_column(last).null_count():
                    raise FastPathUnavailable("a short row or a blank line")
                pending.append(df)
            if pending and (df is None or len(pending) >= group_batches):
                yield group(pending)
                pending = []
            if df is None:
                break
        return check_fields(counted.result())


def select_rows_fast(
    path: Path,
    layout: Layout,
    columns: Sequence[str],
    display: str,
    keep: Sequence[str],
    known: Sequence[str] | None,
) -> tuple[pa.RecordBatch, RowLines, int] | None:
    """All of :func:`iter_rows_fast` at once: ``(rows, lines, total_rows)``, or None where it steps aside."""
    it = iter_rows_fast(path, layout, columns, display, keep, known)
    groups: list[tuple[pa.RecordBatch, RowLines]] = []
    try:
        while True:
            groups.append(next(it))
    except StopIteration as stop:
        total = int(stop.value)
    except FastPathUnavailable:
        return None
    if not groups:
        empty = [pa.array([], pa.string()) for _ in columns]
        return (
            pa.RecordBatch.from_arrays(empty, names=list(columns)),
            RowLines(display, np.zeros(0, np.int64)),
            total,
        )
    batch = pa.Table.from_batches([g[0] for g in groups]).combine_chunks().to_batches()[0]
    lines = np.concatenate([g[1].lines for g in groups])
    return batch, RowLines(display, lines), total


# --------------------------------------------------------------------------- value parsing


def parse_floats(
    col: pa.Array, empty_value: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    vals = (
        pc.cast(pc.if_else(ok, trimmed, pa.scalar("0")), pa.float64()).to_numpy(zero_copy_only=False).copy()
    )
    bad = ~numeric & ~empty
    if empty_value is not None:
        vals[empty] = empty_value
    return vals, empty, bad


# A byte count above this is not a file size (and would overflow int64 on conversion).
_MAX_BYTE_COUNT = float(1 << 53)


def parse_byte_counts(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a byte-count column (``OriginalSize``).

    Returns:
        ``(values, ok, bad)``: int64 values (0 where not ok), the mask of valid
        counts, and the mask of cells that are present but not a byte count
        (non-numeric, negative, fractional, ``inf``/``nan`` or absurdly large).
        Empty cells are neither ok nor bad.
    """
    vals, empty, nonnum = parse_floats(col)
    with np.errstate(invalid="ignore"):
        ok = (
            ~(empty | nonnum)
            & np.isfinite(vals)
            & (vals >= 0)
            & (vals <= _MAX_BYTE_COUNT)
            & (vals == np.floor(vals))
        )
    bad = ~ok & ~empty
    return np.where(ok, vals, 0).astype(np.int64), ok, bad


def duplicate_rows(*columns: np.ndarray) -> np.ndarray:
    """Mask of rows equal in every column to an earlier row (the first of each group is kept).

    Args:
        columns: 1-D arrays of equal length (numbers; compare exactly, ``-0.0 == 0.0``).
    """
    n = len(columns[0]) if columns else 0
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    # A 64-bit hash of each row first: equal rows hash alike, so only rows whose hash is shared
    # can be duplicates; the exact comparison (a lexsort over every column) runs on those alone,
    # which are few, instead of on every row.
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:
            h = (h ^ _column_bits(c)) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
    hs = np.sort(h)
    shared = hs[np.flatnonzero(hs[1:] == hs[:-1])]
    if not len(shared):
        return dup
    cand = np.flatnonzero(np.isin(h, shared))
    sub = [c[cand] for c in columns]
    order = np.lexsort(sub[::-1])  # stable: within a group of equal rows, file order
    same = np.ones(len(cand) - 1, bool)
    for c in sub:
        cs = c[order]
        same &= cs[1:] == cs[:-1]
    dup[cand[order[1:][same]]] = True
    return dup


def _column_bits(c: np.ndarray) -> np.ndarray:
    """The column as uint64 such that values comparing equal get equal bits (``-0.0`` as ``0.0``)."""
    if c.dtype.kind == "f":
        c = c.astype(np.float64) + 0.0  # -0.0 + 0.0 is 0.0
        return c.view(np.uint64)
    return c.astype(np.int64).view(np.uint64)
