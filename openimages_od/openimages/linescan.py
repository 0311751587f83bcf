# Over 400 lines: the compiled kernels and the block reader that feeds them share one contract (which rows are kept, when to step aside) and are read together.
"""A compiled one-pass line scanner for the plan's big unquoted CSVs (:func:`iter_rows_scan`).

The box file of a split is 2.2 GB (V6 train: 14.6M rows), and a plan keeps the rows of a few
classes: 5.6% of them for the benchmark's 20 classes. A general CSV engine (polars) splits and
materialises every projected field of every row before its filter runs. This scanner looks at
each line once, in numba-compiled code on every core, and only:

* counts the line's separators (a row with fewer or more fields than the layout, a blank line
  or an empty last field makes the caller step aside to the exact reader, as the polars path
  does);
* hashes its ``LabelName`` field and looks it up in a table of the known classes;
* keeps the line when its class is kept or unknown, its ImageID is empty, or it holds a byte
  above 0x7F (so UTF-8 is judged by the same parser as the kept rows).

The kept lines (whole, as in the file) are copied together and parsed by pyarrow's CSV reader
as strings, so the values the plan checks are those any CSV parser gives. Rows come in file
order, a block at a time, with their physical lines; the generator returns the file's row count.
It is used by :func:`~openimages_od.openimages.fastcsv.iter_rows_fast` for files of at least
:data:`SCAN_MIN_BYTES` when numba is installed (the first call compiles, or loads from numba's
on-disk cache).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from openimages_od.openimages import jit
from openimages_od.openimages.formats import Layout

__all__ = ["SCAN_MIN_BYTES", "LineScanUnavailable", "available", "iter_rows_scan"]

# Below this the polars path is as fast and the scanner's one-off compile is not worth it.
SCAN_MIN_BYTES = 64 << 20
# Bytes of the file one task scans (its last line is read to its end past this).
BLOCK_BYTES = 32 << 20
_SLACK = 1 << 16  # read past a block's end to finish its last line (more when a line is longer)

# Statuses of a scanned block.
_OK, _SHORT, _EXTRA, _MORE = 0, 1, 2, 3


class LineScanUnavailable(Exception):
    """The scanner cannot read this file (structure or encoding): the caller steps aside."""


def available() -> bool:
    """Whether numba is installed (the scanner can run)."""
    return jit.available()


def _fnv1a(buf: np.ndarray, s: int, e: int) -> np.uint64:
    h = np.uint64(14695981039346656037)
    for j in range(s, e):
        h = (h ^ np.uint64(buf[np.uint64(j)])) * np.uint64(1099511628211)
    return h


def _scan(
    buf: np.ndarray,
    buf64: np.ndarray,
    lo: int,
    hi: int,
    end_is_eof: bool,
    n_fields: int,
    id_col: int,
    label_col: int,
    t_hash: np.ndarray,
    t_idx: np.ndarray,
    mid_bytes: np.ndarray,
    mid_offs: np.ndarray,
    mid_class: np.ndarray,
    keep_unknown: bool,
    out_line: np.ndarray,
    out_start: np.ndarray,
    out_end: np.ndarray,
) -> tuple[int, int, int, int]:
    """Scan the lines of ``buf`` that start in ``[lo, hi)`` (``buf64``: the same memory as whole
    uint64 words; ``buf`` starts 8-byte aligned).

    Returns ``(lines, kept, status, at)``: lines scanned, kept lines written to ``out_*``
    (index of the line in the block, start, end without the newline), the status and, for
    ``_SHORT``/``_EXTRA``, the index of the offending line; ``_MORE``: the last line does not
    end inside ``buf`` (read further).
    """
    n = len(buf)
    mask = len(t_hash) - 1
    i = lo
    line = 0
    nk = 0
    while i < hi:
        start = i
        field = 0
        fstart = i
        label_s = -1
        label_e = -1
        id_empty = False
        high = 0
        # Field by field up to the end of the label field: where the ImageID and LabelName are.
        while field <= label_col:
            while i < n:
                c = buf[np.uint64(i)]
                if c == 44 or c == 10:
                    break
                high |= c
                i += 1
            if field == id_col and i == fstart:
                id_empty = True
            if field == label_col:
                label_s = fstart
                label_e = i
            if i >= n or buf[np.uint64(i)] == 10:
                break
            field += 1
            i += 1
            fstart = i
        # The rest of the line: separators and high bytes only, eight bytes at a time where the
        # word holds no newline (SWAR: the high bit of each byte of ``~((x & M) + M | x | M)``
        # is set exactly where that byte of ``x`` is zero).
        while i < n and (i & 7) != 0 and buf[np.uint64(i)] != 10:
            if buf[np.uint64(i)] == 44:
                field += 1
            high |= buf[np.uint64(i)]
            i += 1
        if i < n and buf[np.uint64(i)] != 10:
            m7 = np.uint64(0x7F7F7F7F7F7F7F7F)
            nl8 = np.uint64(0x0A0A0A0A0A0A0A0A)
            cm8 = np.uint64(0x2C2C2C2C2C2C2C2C)
            ones = np.uint64(0x0101010101010101)
            words = np.uint64(0)
            while i + 8 <= n:
                w = buf64[np.uint64(i >> 3)]
                x = w ^ nl8
                if (~(((x & m7) + m7) | x | m7)) != np.uint64(0):
                    break
                y = w ^ cm8
                commas = (~(((y & m7) + m7) | y | m7)) >> np.uint64(7)
                field += np.int64((commas * ones) >> np.uint64(56))  # type: ignore[assignment]  # numba: stay int64
                words |= w
                i += 8
            if (words & np.uint64(0x8080808080808080)) != np.uint64(0):
                high |= 128
        while i < n:
            c = buf[np.uint64(i)]
            if c == 10:
                break
            if c == 44:
                field += 1
            high |= c
            i += 1
        if i >= n and not end_is_eof:
            return line, nk, _MORE, line
        end = i
        last_e = end
        if last_e > start and buf[last_e - 1] == 13:  # CRLF
            last_e -= 1
        if field != n_fields - 1:
            return line, nk, (_EXTRA if field > n_fields - 1 else _SHORT), line
        if last_e == start or buf[last_e - 1] == 44:  # empty last field (or a one-field blank line)
            return line, nk, _SHORT, line
        if field == label_col:  # the label is the last field
            label_s = fstart
            label_e = last_e
        if id_col == label_col and label_s == label_e:
            id_empty = True
        keep = id_empty or high >= 128
        if not keep:
            cls = 0  # unknown
            if label_e > label_s:
                h = _fnv1a(buf, label_s, label_e)
                k = np.int64(h & np.uint64(mask))
                while t_idx[k] >= 0:
                    if t_hash[k] == h:
                        m = t_idx[k]
                        ms = mid_offs[m]
                        me = mid_offs[m + 1]
                        if me - ms == label_e - label_s:
                            same = True
                            for j in range(me - ms):
                                if mid_bytes[ms + j] != buf[label_s + j]:
                                    same = False
                                    break
                            if same:
                                cls = mid_class[m]
                                break
                    k = (k + 1) & mask
            keep = cls == 1 or (cls == 0 and keep_unknown)
        if keep:
            out_line[nk] = line
            out_start[nk] = start
            out_end[nk] = end
            nk += 1
        line += 1
        i = end + 1
    return line, nk, _OK, -1


def _gather(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, out: np.ndarray) -> int:
    """Copy lines ``buf[starts[k]:ends[k]]`` into ``out``, each followed by a newline.

    The kernels index with unsigned integers in their loops: numba then skips the check for a
    negative index on every access (a byte loop here ran ~10x faster than slice copies).
    """
    p = 0
    for k in range(len(starts)):
        s = starts[k]
        e = ends[k]
        for j in range(s, e):
            out[np.uint64(p)] = buf[np.uint64(j)]
            p += 1
        out[np.uint64(p)] = 10
        p += 1
    return p


def ensure_compiled() -> None:
    """Swap the kernels above for their compiled versions and load them (numba's disk cache)."""

    def build() -> None:
        global _fnv1a, _scan, _gather
        _fnv1a, _scan, _gather = jit.njit(_fnv1a), jit.njit(_scan), jit.njit(_gather)
        z = np.zeros(16, np.uint8)
        i = np.zeros(1, np.int64)
        _fnv1a(z, 0, 1)
        _scan(
            z,
            z.view(np.uint64),
            0,
            0,
            True,
            2,
            0,
            1,
            np.zeros(8, np.uint64),
            np.full(8, -1, np.int32),
            z,
            i,
            np.zeros(1, np.int8),
            True,
            i,
            i,
            i,
        )
        _gather(z, i[:0], i[:0], z)

    jit.compile_once(__name__, build)


class _Labels:
    """An open-addressing table of label MIDs for :func:`_scan`: class 1 kept, 2 other known."""

    def __init__(self, keep: Sequence[str], known: Sequence[str] | None) -> None:
        keep_set = set(keep)
        mids = list(dict.fromkeys(list(keep) + [m for m in (known or []) if m not in keep_set]))
        raw = [m.encode() for m in mids]
        self.offs = np.zeros(len(raw) + 1, np.int64)
        self.offs[1:] = np.cumsum([len(b) for b in raw])
        self.bytes = np.frombuffer(b"".join(raw) or b"\0", np.uint8).copy()
        size = 8
        while size < 4 * len(raw):
            size *= 2
        self.hash = np.zeros(size, np.uint64)
        self.idx = np.full(size, -1, np.int32)
        self.cls = np.array([1 if m in keep_set else 2 for m in mids] or [0], np.int8)
        for j, b in enumerate(raw):
            h = _fnv1a(np.frombuffer(b, np.uint8), 0, len(b))
            k = int(h & np.uint64(size - 1))
            while self.idx[k] >= 0:
                k = (k + 1) & (size - 1)
            self.hash[k] = h
            self.idx[k] = j
        self.keep_unknown = known is not None


def _find_newline(buf: np.ndarray, frm: int) -> int:
    """Index of the first newline in ``buf`` at or after ``frm``, or -1.

    In growing windows: the line in progress at a block's start ends within a few hundred bytes,
    and comparing the whole 32 MB block to find it cost ~18 ms a block (1.3 CPU-s on a V6 box file).
    """
    step = 4096
    while frm < len(buf):
        hit = np.flatnonzero(buf[frm : frm + step] == 10)
        if len(hit):
            return frm + int(hit[0])
        frm += step
        step *= 4
    return -1


def _data_start(path: Path, has_header: bool) -> int:
    if not has_header:
        return 0
    with open(path, "rb") as fh:
        fh.readline()
        return fh.tell()


def iter_rows_scan(
    path: Path,
    layout: Layout,
    columns: Sequence[str],
    keep: Sequence[str],
    known: Sequence[str] | None,
    block_bytes: int | None = None,
) -> Generator[tuple[pa.RecordBatch, np.ndarray], None, int]:
    """Kept rows of an unquoted CSV, a block at a time: ``(rows, physical lines)``; returns the row count.

    The rows are those :func:`~openimages_od.openimages.fastcsv.iter_rows_fast` returns: the
    ``columns`` as strings (empty fields ``""``) of rows whose ``LabelName`` is in ``keep`` or
    (with ``known``) not a known class, or whose ImageID is empty; plus rows with bytes above
    0x7F, whose class the caller's checks look up.

    Raises:
        LineScanUnavailable: a row with fewer or more fields than the layout, a blank line, an
            empty last field or invalid UTF-8 in a kept row: the caller reads the file exactly.
    """
    if not available():
        raise LineScanUnavailable("numba is not installed")
    ensure_compiled()
    cols = list(layout.columns)
    if "LabelName" not in cols or "ImageID" not in cols:
        raise LineScanUnavailable("no LabelName/ImageID column")
    block = block_bytes or BLOCK_BYTES
    labels = _Labels(keep, known)
    header = 1 if layout.has_header else 0
    first = _data_start(path, layout.has_header)
    size = path.stat().st_size
    params = (len(cols), cols.index("ImageID"), cols.index("LabelName"))
    read_opts = pacsv.ReadOptions(column_names=cols, use_threads=False, block_size=1 << 26)
    parse_opts = pacsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False)
    conv_opts = pacsv.ConvertOptions(
        include_columns=list(columns),
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        null_values=[],
        check_utf8=True,
    )
    fd = os.open(path, os.O_RDONLY)
    scratch = threading.local()

    def task(lo: int) -> tuple[int, pa.RecordBatch | None, np.ndarray, int, int]:
        """Scan the lines starting in ``[lo, lo + block)``: (lines, kept rows, their line index, status, at)."""
        hi = min(size, lo + block)
        # One byte before ``lo``: a line starts at ``lo`` only if that byte is a newline.
        back = 1 if lo > first else 0
        slack = _SLACK
        while True:
            want = min(size, hi + slack) - (lo - back)
            # One reused buffer per thread: a fresh one per read page-faults (1.4 s of 2.2 GB).
            mem = getattr(scratch, "mem", None)
            if mem is None or len(mem) < want + 8:
                mem = scratch.mem = np.empty(want + 8 + (want >> 3), np.uint8)
            got = os.preadv(fd, [mem[:want].data], lo - back)
            buf = mem[:got]
            buf64 = mem[: got - (got & 7)].view(np.uint64)
            start = back
            if back and buf[0] != 10:  # the line in progress at ``lo`` belongs to the previous task
                nl = _find_newline(buf, back)
                start = got if nl < 0 else nl + 1
            stop = hi - (lo - back)
            if start >= stop:
                return 0, None, np.zeros(0, np.int64), _OK, -1
            cap = (stop - start) // 2 + 2  # a line is at least two bytes
            outs = getattr(scratch, "outs", None)  # reused too; only kept lines are written
            if outs is None or len(outs) < 3 * cap:
                outs = scratch.outs = np.empty(3 * cap, np.int64)
            out_line, out_start, out_end = outs[:cap], outs[cap : 2 * cap], outs[2 * cap : 3 * cap]
            lines, nk, status, at = _scan(
                buf,
                buf64,
                start,
                stop,
                lo - back + got >= size,
                *params,
                labels.hash,
                labels.idx,
                labels.bytes,
                labels.offs,
                labels.cls,
                labels.keep_unknown,
                out_line,
                out_start,
                out_end,
            )
            if status == _MORE:
                slack *= 4
                continue
            if status != _OK or not nk:
                return lines, None, out_line[:nk].copy(), status, at
            starts, ends = out_start[:nk], out_end[:nk]
            packed = np.empty(int((ends - starts).sum()) + nk, np.uint8)
            _gather(buf, starts, ends, packed)
            try:
                table = pacsv.read_csv(
                    pa.py_buffer(packed),
                    read_options=read_opts,
                    parse_options=parse_opts,
                    convert_options=conv_opts,
                )
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise LineScanUnavailable(f"kept rows not readable as UTF-8 CSV ({exc})") from None
            if table.num_rows != nk:
                raise LineScanUnavailable("kept rows do not parse to one row per line")
            batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
            return lines, batch, out_line[:nk].copy(), _OK, -1

    n_workers = max(1, min(os.cpu_count() or 1, 8))
    total = 0
    try:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="oiod-linescan") as pool:
            offsets = iter(range(first, max(first, size), block))
            pending: list[Future[Any]] = []
            for lo in offsets:
                pending.append(pool.submit(task, lo))
                if len(pending) >= 2 * n_workers:
                    break
            try:
                while pending:
                    lines, batch, rel, status, at = pending.pop(0).result()
                    if status == _EXTRA:
                        raise LineScanUnavailable(f"line {total + at + header + 1}: a row with extra fields")
                    if status == _SHORT:
                        raise LineScanUnavailable(
                            f"line {total + at + header + 1}: a short row or a blank line"
                        )
                    nxt = next(offsets, None)
                    if nxt is not None:
                        pending.append(pool.submit(task, nxt))
                    if batch is not None:
                        yield batch, rel + (total + header + 1)
                    total += lines
            finally:  # an error, a step aside or a consumer that stops early: drop the read-ahead
                for f in pending:
                    f.cancel()
    finally:
        os.close(fd)
    return total
