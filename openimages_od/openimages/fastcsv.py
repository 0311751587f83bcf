"""The polars fast path for well-formed, unquoted ID/label CSVs (:func:`select_rows_fast`,
:func:`iter_rows_fast`) and the vectorised value parsing shared with the
:class:`.csvstream.CsvStream` callers. It steps aside (:class:`FastPathUnavailable`) for anything structurally odd."""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.openimages import linescan
from openimages_od.openimages.csvstream import RowLines, _first_line_quoted, count_lines_and_commas
from openimages_od.openimages.formats import Layout

log = logging.getLogger(__name__)

__all__ = [
    "FastPathUnavailable",
    "duplicate_rows",
    "iter_rows_fast",
    "parse_byte_counts",
    "parse_floats",
    "select_rows_fast",
]

_FLOAT_RE = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
# A byte count above this is not a file size (and would overflow int64 on conversion).
_MAX_BYTE_COUNT = float(1 << 53)


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
    if linescan.available() and layout.has_header and path.stat().st_size >= linescan.SCAN_MIN_BYTES:
        # Big files: the compiled line scanner converts only the kept rows (the same rows, the
        # same strings, the same reasons to step aside).
        scanned = linescan.iter_rows_scan(path, layout, columns, keep, known)
        try:
            while True:
                rows, lines = next(scanned)
                yield rows, RowLines(display, lines)
        except StopIteration as stop:
            return int(stop.value)
        except linescan.LineScanUnavailable as exc:
            log.debug("%s: line scanner stepped aside (%s)", display, exc)
            raise FastPathUnavailable(str(exc)) from None
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
        # Arrow string views straight from polars' buffers (the default, large strings, is a copy
        # per column: 0.67 s of the V6 benchmark's box read); the cast below makes the one copy.
        table = df.select([pl.col(c).fill_null("") for c in columns]).to_arrow(
            compat_level=pl.CompatLevel.newest()
        )
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
