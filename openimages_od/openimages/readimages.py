"""Reading the image-level files of one split: the image-level labels and the image index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.openimages.csvstream import CsvStream
from openimages_od.openimages.fastcsv import parse_byte_counts, parse_floats, select_rows_fast
from openimages_od.openimages.formats import MalformedLog, detect_layout
from openimages_od.openimages.idkeys import IdSet
from openimages_od.openimages.readboxes import Lines, blank_rows, record, valid_ids

__all__ = ["read_image_index", "read_image_labels"]


def read_image_labels(
    path: Path, display: str, known: pa.Array | None, keep: pa.Array, logm: MalformedLog
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(image_id, code into ``keep``, confidence) of image-level labels of kept classes."""
    layout = detect_layout(path, "image_labels", display)
    cols = ["ImageID", "LabelName", "Confidence"]
    ids_l: list[pa.Array] = []
    code_l: list[np.ndarray] = []
    conf_l: list[np.ndarray] = []
    fast = select_rows_fast(
        path, layout, cols, display, keep.to_pylist(), known.to_pylist() if known is not None else None
    )
    batches: Any = [(fast[0], 0)] if fast is not None else CsvStream(path, layout, cols, display, logm)
    lines: Lines = fast[1] if fast is not None else batches
    for batch, g0 in batches:
        blog = logm.batch_log()
        got = _read_labels_batch(batch, g0, lines, blog, known, keep)
        logm.end_batch(blog)
        if got is not None:
            ids_l.append(got[0])
            code_l.append(got[1])
            conf_l.append(got[2])
    ids_all = pa.concat_arrays(ids_l) if ids_l else pa.array([], pa.string())
    return (
        ids_all,
        np.concatenate(code_l) if code_l else np.zeros(0, np.int32),
        np.concatenate(conf_l) if conf_l else np.zeros(0, np.float32),
    )


def _read_labels_batch(
    batch: pa.RecordBatch,
    g0: int,
    stream: Lines,
    logm: MalformedLog,
    known: pa.Array | None,
    keep: pa.Array,
) -> tuple[pa.Array, np.ndarray, np.ndarray] | None:
    label = batch.column("LabelName")
    blank = blank_rows(batch, stream, g0, logm)
    if known is not None:
        unknown = pc.index_in(label, value_set=known).is_null().to_numpy(zero_copy_only=False) & ~blank
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
        return None
    sub = batch.filter(pa.array(sel))
    ids = sub.column("ImageID")
    conf, empty, nonnum = parse_floats(sub.column("Confidence"))
    with np.errstate(invalid="ignore"):
        bad_id = ~valid_ids(ids)
        bad_num = (empty | nonnum) & ~bad_id
        oor = ~((conf >= 0) & (conf <= 1)) & ~bad_id & ~bad_num
    rows = np.flatnonzero(sel)
    for mask, reason, det in (
        (bad_id, "bad_image_id", "ImageID is not 16 hex digits"),
        (bad_num, "non_numeric", "Confidence is not a number"),
        (oor, "out_of_range", "Confidence outside [0, 1]"),
    ):
        if mask.any():
            full = np.zeros(batch.num_rows, bool)
            full[rows[mask]] = True
            record(logm, stream, g0, full, reason, lambda i, d=det: d)
    good = ~(bad_id | bad_num | oor)
    return (
        ids.filter(pa.array(good)),
        code.filter(pa.array(sel)).to_numpy(zero_copy_only=False)[good].astype(np.int32),
        conf[good].astype(np.float32),
    )


def read_image_index(
    path: Path,
    display: str,
    wanted: pa.Array,
    logm: MalformedLog,
    sink: Callable[[pa.Table], None] | None = None,
) -> pa.Table | None:
    """Image-index rows of the ``wanted`` ImageIDs (first row wins), columns normalised.

    With ``sink``, each batch's rows go to it as they are read (file order) and None is returned.
    """
    layout = detect_layout(path, "images", display)
    has_rot = "Rotation" in layout.columns
    cols = ["ImageID", "OriginalURL", "Thumbnail300KURL", "OriginalSize", "OriginalMD5"] + (
        ["Rotation"] if has_rot else []
    )
    # Smaller blocks than the box reader's: the index's rows are long and few are kept.
    stream = CsvStream(path, layout, cols, display, logm, newlines_in_values=True, block_size=4 << 20)
    tables = []
    outer = logm
    wanted_set = IdSet(wanted)
    for batch, g0 in stream:
        outer.end_batch(logm)  # strict mode: the previous batch's earliest bad row, if any
        logm = outer.batch_log()
        sel = wanted_set.contains(batch.column("ImageID"))
        if not sel.any():
            continue
        rows = np.flatnonzero(sel)
        sub = batch.filter(pa.array(sel))
        size, size_ok, s_bad_mask = parse_byte_counts(sub.column("OriginalSize"))  # inf, nan, 1e30: bad
        if s_bad_mask.any():
            full = np.zeros(batch.num_rows, bool)
            full[rows[s_bad_mask]] = True
            record(logm, stream, g0, full, "non_numeric", lambda i: "OriginalSize is not a byte count")
        if has_rot:
            rot, r_empty, r_bad = parse_floats(sub.column("Rotation"))
            with np.errstate(invalid="ignore"):
                nan = np.isnan(rot)
                r_known = ~(r_empty | r_bad | nan)
                r_invalid = r_known & ~np.isin(rot, (0.0, 90.0, 180.0, 270.0))
            if (r_bad | r_invalid).any():
                full = np.zeros(batch.num_rows, bool)
                full[rows[r_bad | r_invalid]] = True
                record(logm, stream, g0, full, "bad_rotation", lambda i: "Rotation is not 0, 90, 180 or 270")
            rot_arr = pa.array(
                np.where(r_known & ~r_invalid, rot, 0).astype(np.int32), mask=~(r_known & ~r_invalid)
            )
        else:
            rot_arr = pa.nulls(len(rows), pa.int32())

        rows_t = pa.table(
            {
                "image_id": sub.column("ImageID"),
                "original_url": nz(sub.column("OriginalURL")),
                "thumbnail_url": nz(sub.column("Thumbnail300KURL")),
                "original_md5": nz(sub.column("OriginalMD5")),
                "original_size": pa.array(size, mask=~size_ok),
                "rotation": rot_arr,
            }
        )
        if sink is not None:
            sink(rows_t)
        else:
            tables.append(rows_t)
    outer.end_batch(logm)
    if sink is not None:
        return None
    if not tables:
        return pa.table(
            {
                "image_id": pa.array([], pa.string()),
                "original_url": pa.array([], pa.string()),
                "thumbnail_url": pa.array([], pa.string()),
                "original_md5": pa.array([], pa.string()),
                "original_size": pa.array([], pa.int64()),
                "rotation": pa.array([], pa.int32()),
            }
        )
    return pa.concat_tables(tables)


def nz(col: pa.Array) -> pa.Array:
    """The string column with empty strings as nulls: a validity bitmap over the same buffers
    (no copy of the strings, as ``if_else`` makes)."""
    col = col.cast(pa.string())
    n = len(col)
    offs = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + n + 1]
    present = offs[1:] != offs[:-1]
    if col.null_count:
        present &= col.is_valid().to_numpy(zero_copy_only=False)
    if present.all():
        return col
    validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    _, offsets, data = col.buffers()
    return pa.Array.from_buffers(pa.string(), n, [validity, offsets.slice(4 * col.offset), data])
