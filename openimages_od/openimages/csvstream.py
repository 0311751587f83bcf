# Over 400 lines: the streaming reader, its read-ahead thread and the physical-line bookkeeping share state (skipped rows, swallowed-quote checks) and are read together.
"""The streaming, validating CSV reader (:class:`CsvStream`) and the physical-line bookkeeping
behind every ``file:line`` the plan reports. The file layouts it reads are in :mod:`.formats`."""

from __future__ import annotations

import logging
import mmap
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from openimages_od.errors import DataError
from openimages_od.openimages.formats import Layout, MalformedLog

log = logging.getLogger(__name__)

__all__ = ["CsvStream", "RowLines", "count_lines", "count_lines_and_commas"]

# Inside one field: a line break then the start of an Open Images record (ImageID is
# the first column of every layout): rows swallowed by an unbalanced quote.
_SWALLOWED_RE = r"\n[0-9a-fA-F]{16},"
_SWALLOWED_PY = re.compile(_SWALLOWED_RE)


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
    return _count(path, 512 << 10, commas=False)[0]


def count_lines_and_commas(path: Path, chunk: int = 512 << 10) -> tuple[int, int]:
    """``(physical lines, commas)`` of a file, in one read (a last line without a newline counts)."""
    return _count(path, chunk, commas=True)


def _count(path: Path, chunk: int, commas: bool) -> tuple[int, int]:
    """Physical lines and, with ``commas``, commas (else 0) of a file, in one read.

    Reads into one reused buffer and counts with numpy: ``bytes.count`` scans a byte at a
    time and a fresh buffer per read page-faults, which made a line count a second of CPU on
    a 2 GB file, run beside the parser on the same cores. The buffer is small enough to stay in
    the CPU cache between the read and the two compares (2.2 GB: 0.6-0.8 CPU-s with 512 KB,
    1.04 with 8 MB).
    """
    buf = bytearray(chunk)
    arr = np.frombuffer(buf, np.uint8)
    eq = np.empty(chunk, bool)
    lines = n_commas = 0
    last = 10  # b"\n": an empty file has no lines
    with open(path, "rb", buffering=0) as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            np.equal(arr[:k], 10, out=eq[:k])
            lines += int(np.count_nonzero(eq[:k]))
            if commas:
                np.equal(arr[:k], 44, out=eq[:k])
                n_commas += int(np.count_nonzero(eq[:k]))
            last = int(arr[k - 1])
    return lines + (0 if last == 10 else 1), n_commas


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
        # The parser runs on a read-ahead thread (see _read_ahead) and reports skipped rows from
        # there, while the consumer maps rows to lines: the bookkeeping is shared under a lock.
        self._lock = threading.Lock()
        self._line_count: Future[int] | None = None
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
        with self._lock:
            return self._record_invalid(row)

    def _record_invalid(self, row: pacsv.InvalidRow) -> str:
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
        with self._lock:
            for s in self._skipped:
                if s <= p:
                    p += 1
                else:
                    break
        return p

    def _flush_pending(self, upto_line: int | None) -> None:
        keep: list[tuple[str, int | None, str]] = []
        with self._lock:
            pending, self._pending = self._pending, []
        for reason, line, detail in pending:
            if upto_line is None or line is None or line <= upto_line:
                self.log.add(reason, self.display, line, detail)
            else:
                keep.append((reason, line, detail))
        if keep:
            with self._lock:
                self._pending[:0] = keep

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
        physical = self._line_count.result() if self._line_count is not None else count_lines(self.path)
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
        pool = ThreadPoolExecutor(max_workers=1)
        # The physical line count that _check_line_count compares with, counted beside the parse.
        self._line_count = pool.submit(count_lines, self.path) if self.quoting else None
        try:
            reader = pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=conv)
            for batch, swallow in _read_ahead(reader, lambda: self._swallow):
                n = batch.num_rows
                if swallow is not None:
                    raise DataError(swallow)
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
            pool.shutdown(wait=True)
            self._locator.close()


def _read_ahead(
    reader: Any, state: Callable[[], str | None], depth: int = 2
) -> Iterator[tuple[pa.RecordBatch, str | None]]:
    """The reader's batches, parsed on a thread ``depth`` batches ahead of the consumer.

    pyarrow parses with the GIL released, so the next batch is parsed while the caller checks
    this one (the image index: 0.75 s of parsing beside ~0.55 s of checks). Each batch comes with
    ``state()`` read right after it was parsed (the swallowed-rows message), so the consumer sees
    it at the same batch as without read-ahead. Parser errors are raised in the consumer.
    """
    q: queue.Queue[tuple[str, Any, str | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any, str | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                if not put(("batch", batch, state())):
                    return
            put(("end", None, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc, None))

    t = threading.Thread(target=produce, name="csv-read-ahead", daemon=True)
    t.start()
    try:
        while True:
            kind, item, swallow = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item, swallow
    finally:
        stop.set()
        t.join()


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
