"""Reading and validating the box CSV of one split (step 1 of a split's plan).

A well-formed unquoted file goes through polars' streaming engine, keeping only rows of kept
or unknown classes with their lines (:func:`~openimages_od.openimages.fastcsv.iter_rows_fast`);
anything else is streamed by :class:`~openimages_od.openimages.csvstream.CsvStream`, which reports
structural damage row by row. The kept rows are then validated (ImageID, numbers, ranges,
XMin <= XMax, attributes); malformed rows are counted by reason with file:line examples (or stop
the run with ``selection.strict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.openimages.csvstream import CsvStream, RowLines
from openimages_od.openimages.fastcsv import FastPathUnavailable, duplicate_rows, iter_rows_fast, parse_floats
from openimages_od.openimages.formats import ATTRIBUTE_COLUMNS, MalformedLog, detect_layout
from openimages_od.openimages.idkeys import hex_keys, id_keys

__all__ = ["Boxes", "Lines", "blank_rows", "read_boxes", "record", "valid_ids"]

Lines = CsvStream | RowLines  # where a checked row's file:line comes from


def record(logm: MalformedLog, stream: Lines, g0: int, mask: np.ndarray, reason: str, detail_fn: Any) -> None:
    """Count rows of ``mask`` under ``reason``; examples (and strict mode) get file:line."""
    n = int(mask.sum())
    if not n:
        return
    idx = np.flatnonzero(mask)
    shown = 0
    while shown < len(idx) and logm.wants_examples(reason):
        i = int(idx[shown])
        logm.add(reason, stream.display, stream.line_of(g0 + i), detail_fn(i))
        shown += 1
    if n > shown:
        logm.counts[reason] = logm.counts.get(reason, 0) + (n - shown)


def blank_rows(batch: pa.RecordBatch, stream: Lines, g0: int, logm: MalformedLog) -> np.ndarray:
    """Rows whose ImageID is empty (blank lines parse as rows of empty fields): counted as missing fields."""
    blank = pc.equal(pc.binary_length(batch.column("ImageID")), 0).to_numpy(zero_copy_only=False)
    if blank.any():
        record(logm, stream, g0, blank, "missing_fields", lambda i: "empty ImageID (blank line?)")
    return blank


def valid_ids(ids: pa.Array) -> np.ndarray:
    """Where each ImageID is 16 hex digits (either case): read from the string bytes, no regex."""
    return id_keys(ids)[1]


@dataclass
class Boxes:
    """Selected, validated boxes of one split (columnar)."""

    image_id: pa.Array
    code: np.ndarray  # index into the keep list
    coords: np.ndarray  # (n, 4) float32: xmin, xmax, ymin, ymax
    confidence: np.ndarray
    attrs: np.ndarray  # (n, 5) int8, -1 unknown
    has_attrs: bool
    rows_read: int = 0


def read_boxes(path: Path, display: str, known: pa.Array | None, keep: pa.Array, logm: MalformedLog) -> Boxes:
    """Validated boxes of the ``keep`` classes in the box CSV at ``path`` (exact duplicates dropped).

    Args:
        path: the local box CSV.
        display: the name errors give the file (its URL).
        known: every known class MID (rows of other classes are ``unknown_mid``), or None.
        keep: the MIDs whose boxes to return; :attr:`Boxes.code` indexes into it.
        logm: where malformed rows are counted.
    """
    layout = detect_layout(path, "boxes", display)
    has_attrs = ATTRIBUTE_COLUMNS[0] in layout.columns
    cols = ["ImageID", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax"] + (
        list(ATTRIBUTE_COLUMNS) if has_attrs else []
    )
    parts: dict[str, list] = {"id": [], "code": [], "coords": [], "conf": [], "attrs": []}
    fast = _read_boxes_fast(path, layout, cols, display, known, keep, has_attrs, logm)
    if fast is not None:
        parts, rows_read = fast
    else:
        stream = CsvStream(path, layout, cols, display, logm)
        for batch, g0 in stream:
            blog = logm.batch_log()
            _read_boxes_batch(batch, g0, stream, blog, known, keep, has_attrs, parts)
            logm.end_batch(blog)
        rows_read = stream.rows_read
    ids_all = (
        pa.concat_arrays([a.cast(pa.string()) for a in parts["id"]])
        if parts["id"]
        else pa.array([], pa.string())
    )
    b = Boxes(
        image_id=ids_all,
        code=np.concatenate(parts["code"]) if parts["code"] else np.zeros(0, np.int32),
        coords=np.concatenate(parts["coords"]) if parts["coords"] else np.zeros((0, 4), np.float32),
        confidence=np.concatenate(parts["conf"]) if parts["conf"] else np.zeros(0, np.float32),
        attrs=np.concatenate(parts["attrs"]) if parts["attrs"] else np.zeros((0, 5), np.int8),
        has_attrs=has_attrs,
        rows_read=rows_read,
    )
    # Exact duplicate rows (same image, class, box, confidence, attributes) are one box.
    dup = duplicate_rows(hex_keys(b.image_id), b.code, *b.coords.T, b.confidence, *b.attrs.T)
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        logm.add(
            "duplicate_box",
            display,
            None,
            f"ImageID {b.image_id[first].as_py()} class {keep[b.code[first]].as_py()} "
            f"box {b.coords[first].tolist()} repeated",
            count=int(dup.sum()),
        )
        k = ~dup
        b = Boxes(
            b.image_id.filter(pa.array(k)),
            b.code[k],
            b.coords[k],
            b.confidence[k],
            b.attrs[k],
            has_attrs,
            b.rows_read,
        )
    return b


def _read_boxes_fast(
    path: Path,
    layout: Any,
    cols: list[str],
    display: str,
    known: pa.Array | None,
    keep: pa.Array,
    has_attrs: bool,
    logm: MalformedLog,
) -> tuple[dict[str, list], int] | None:
    """The checks of :func:`_read_boxes_batch` on the rows :func:`iter_rows_fast` keeps, group by group
    (so memory holds parsed values, not strings, of the kept rows); None where the fast path steps aside.

    Rows are recorded in a scratch log, merged only when the whole file went through, so a file the
    fast path gives up on half-way is not counted twice.
    """
    scratch = MalformedLog(strict=logm.strict, max_examples=logm.max_examples)
    parts: dict[str, list] = {"id": [], "code": [], "coords": [], "conf": [], "attrs": []}
    it = iter_rows_fast(
        path,
        layout,
        cols,
        display,
        keep.to_pylist(),
        known.to_pylist() if known is not None else None,
        strict=logm.strict,
    )
    try:
        while True:
            rows, lines = next(it)
            blog = scratch.batch_log()
            _read_boxes_batch(rows, 0, lines, blog, known, keep, has_attrs, parts)
            scratch.end_batch(blog)
    except StopIteration as stop:
        rows_read = int(stop.value)
    except FastPathUnavailable:
        return None
    logm.merge(scratch)
    return parts, rows_read


def _read_boxes_batch(
    batch: pa.RecordBatch,
    g0: int,
    stream: Lines,
    logm: MalformedLog,
    known: pa.Array | None,
    keep: pa.Array,
    has_attrs: bool,
    parts: dict[str, list],
) -> None:
    """Validate one batch; append its good rows of kept classes to ``parts``."""
    label = batch.column("LabelName")
    blank = blank_rows(batch, stream, g0, logm)
    if known is not None:
        kidx = pc.index_in(label, value_set=known)
        unknown = kidx.is_null().to_numpy(zero_copy_only=False) & ~blank
        if unknown.any():
            record(
                logm,
                stream,
                g0,
                unknown,
                "unknown_mid",
                lambda i: f"LabelName {label[i].as_py()!r} is not a known class",
            )
    code = pc.index_in(label, value_set=keep)
    sel = code.is_valid().to_numpy(zero_copy_only=False) & ~blank
    if not sel.any():
        return
    rows = np.flatnonzero(sel)
    sub = batch.filter(pa.array(sel))
    code_np = code.filter(pa.array(sel)).to_numpy(zero_copy_only=False).astype(np.int32)
    ids = sub.column("ImageID")
    bad = np.zeros(len(rows), bool)

    def rec(mask: np.ndarray, reason: str, detail: Any) -> None:
        m = mask & ~bad
        if m.any():
            full = np.zeros(batch.num_rows, bool)
            full[rows[m]] = True
            pos = {int(r): j for j, r in enumerate(rows)}
            record(logm, stream, g0, full, reason, lambda i: detail(pos[i]))
            bad[:] |= m

    rec(~valid_ids(ids), "bad_image_id", lambda j: f"ImageID {ids[j].as_py()!r} is not 16 hex digits")
    vals = {}
    for c in ("XMin", "XMax", "YMin", "YMax", "Confidence"):
        col = sub.column(c)
        v, empty, nonnum = parse_floats(col)
        rec(empty, "missing_fields", lambda j, c=c: f"{c} is empty")
        rec(nonnum, "non_numeric", lambda j, c=c, col=col: f"{c} {col[j].as_py()!r} is not a number")
        vals[c] = v
    xmin, xmax, ymin, ymax, conf = (vals[c] for c in ("XMin", "XMax", "YMin", "YMax", "Confidence"))
    with np.errstate(invalid="ignore"):
        coords = np.stack([xmin, xmax, ymin, ymax], axis=1)
        oor = ~((coords >= 0.0) & (coords <= 1.0)).all(axis=1) | ~((conf >= 0.0) & (conf <= 1.0))
    rec(
        oor,
        "out_of_range",
        lambda j: f"coordinates {coords[j].tolist()} / confidence {conf[j]} outside [0, 1]",
    )
    rec(
        (xmin > xmax) | (ymin > ymax),
        "min_greater_than_max",
        lambda j: f"XMin {xmin[j]} > XMax {xmax[j]} or YMin {ymin[j]} > YMax {ymax[j]}",
    )
    if has_attrs:
        attrs = np.empty((len(rows), 5), np.int8)
        for k, c in enumerate(ATTRIBUTE_COLUMNS):
            col = sub.column(c)
            v, _, nonnum = parse_floats(col, empty_value=-1.0)  # empty attribute = unknown
            rec(nonnum, "non_numeric", lambda j, c=c, col=col: f"{c} {col[j].as_py()!r} is not a number")
            badv = ~np.isin(v, (-1.0, 0.0, 1.0)) & ~nonnum
            rec(badv, "bad_attribute", lambda j, c=c, v=v: f"{c} {v[j]} is not -1, 0 or 1")
            attrs[:, k] = np.where(np.isin(v, (-1.0, 0.0, 1.0)), v, -1).astype(np.int8)
    else:
        attrs = np.full((len(rows), 5), -1, np.int8)
    good = ~bad
    if not good.all():
        gm = pa.array(good)
        ids, code_np, coords, conf, attrs = (
            ids.filter(gm),
            code_np[good],
            coords[good],
            conf[good],
            attrs[good],
        )
    parts["id"].append(ids)
    parts["code"].append(code_np)
    parts["coords"].append(coords.astype(np.float32))
    parts["conf"].append(conf.astype(np.float32))
    parts["attrs"].append(attrs)
