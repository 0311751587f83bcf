"""``oiod plan``: Open Images metadata -> label map + deterministic shard plan.

Pipeline per split, all in bounded memory:

1. read the box CSV: a well-formed unquoted file through polars' streaming
   engine, keeping only rows of kept or unknown classes with their lines
   (:func:`~openimages_od.openimages.formats.select_rows_fast`), anything else
   streamed by :class:`~openimages_od.openimages.formats.CsvStream`, which
   reports structural damage row by row; then validate the kept rows (ImageID, numbers, ranges, XMin <= XMax, attributes);
   malformed rows are counted by reason (or stop the run with ``selection.strict``);
2. apply attribute filters, ``min_confidence`` and the optional hierarchy
   expansion (ancestors that are selected classes, as the OID evaluation does);
3. group boxes by image without pandas: sort once by image position and cut
   list columns with ``pa.ListArray.from_arrays`` offsets;
4. apply the caps (``max_images_per_class``, ``max_images``) with a seeded hash
   rank, so the choice is deterministic and independent of row order;
5. stream the image index (membership by sorted uint64 keys of the selected
   ImageIDs, built once) and the image-level labels (as the boxes);
6. assign shards with :func:`planio.shard_of` and write Parquet shards, stats,
   the label map, the resolved config and, last, the manifest.

Remote inputs (``http(s)://``, ``s3://``) are downloaded once and cached under
``{output}/metadata/`` (for an ``s3://`` output: a local cache, with a copy
uploaded there so any machine can reuse it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.config import Config, join_url, save_resolved
from openimages_od.errors import ConfigError, DataError
from openimages_od.layout import Layout, image_settings
from openimages_od.openimages import assemble, planio
from openimages_od.openimages.classes import (
    ClassDescriptions,
    Hierarchy,
    display_names,
    read_class_descriptions,
    read_hierarchy,
    read_trainable,
    resolve_classes,
    trainable_names,
)
from openimages_od.openimages.formats import (
    ATTRIBUTE_COLUMNS,
    CsvStream,
    FastPathUnavailable,
    MalformedLog,
    RowLines,
    detect_layout,
    duplicate_rows,
    iter_rows_fast,
    parse_byte_counts,
    parse_floats,
    select_rows_fast,
)
from openimages_od.openimages.ids import source_ids
from openimages_od.openimages.labelmap import LabelMap, assign_ids
from openimages_od.outputlock import output_lock
from openimages_od.storage import Storage, local_path

log = logging.getLogger(__name__)

__all__ = ["MetadataInputs", "PlanResult", "build_plan", "run_plan"]

_Lines = CsvStream | RowLines  # where a checked row's file:line comes from
_ATTR_FIELDS = ("is_occluded", "is_truncated", "is_group_of", "is_depiction", "is_inside")
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


@dataclass
class PlanResult:
    """What ``oiod plan`` wrote."""

    plan_url: str
    manifest: planio.PlanManifest
    stats: dict[str, Any]
    label_map: LabelMap
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "plan_url": self.plan_url,
            "manifest": self.manifest.to_json(),
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- inputs


class MetadataInputs:
    """Resolves metadata URLs to local files, downloading remote ones once.

    For a local output the cache is ``{output}/metadata/{scheme}/{host}/{path}``;
    for an ``s3://`` output a local temp cache is used and a copy is uploaded to
    the same relative key under ``{output}/metadata/`` (reused on later runs).
    """

    def __init__(self, cfg: Config, storage: Storage) -> None:
        self.storage = storage
        self.output_root = cfg.output_root
        out_local = local_path(self.output_root)
        if out_local is not None:
            self.cache_dir = out_local / "metadata"
            self.remote_cache: str | None = None
        else:
            digest = hashlib.sha256(self.output_root.encode()).hexdigest()[:16]
            self.cache_dir = Path(tempfile.gettempdir()) / f"oiod-metadata-{os.getuid()}" / digest
            self.remote_cache = join_url(self.output_root, "metadata")

    def local(self, url: str) -> Path:
        """A local path holding ``url``'s bytes."""
        lp = local_path(url)
        if lp is not None:
            return self.storage.cached_local(url, self.cache_dir)  # the file itself, no copy
        p = urlparse(url)
        rel = "/".join(x for x in (p.scheme, p.netloc, p.path.lstrip("/")) if x)
        dest = self.cache_dir / rel
        if dest.is_file():
            return dest
        if self.remote_cache is None:
            return self.storage.cached_local(url, self.cache_dir)
        cached_url = join_url(self.remote_cache, rel)
        if self.storage.exists(cached_url):
            return self.storage.download_file(cached_url, dest)
        path = self.storage.cached_local(url, self.cache_dir)
        self.storage.upload_file(path, cached_url)
        return path

    def text(self, url: str) -> str:
        data = self.local(url).read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{url}: not UTF-8 text ({exc})") from None


# --------------------------------------------------------------------------- helpers


def _id_keys(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, ok)``: the uint64 value of each 16-hex-digit ImageID (0 where not one) and where it is one.

    Reads the string bytes straight from the Arrow buffers: no Python string per row.
    """
    n = len(ids)
    keys = np.zeros(n, np.uint64)
    if n == 0:
        return keys, np.zeros(0, bool)
    ids = ids.cast(pa.string())
    if ids.null_count:
        ids = pc.fill_null(ids, "")
    is16 = pc.equal(pc.binary_length(ids), 16).to_numpy(zero_copy_only=False)
    sub = ids if is16.all() else ids.filter(pa.array(is16))
    ok = is16.copy()
    if len(sub):
        offs = np.frombuffer(sub.buffers()[1], np.int32)[sub.offset : sub.offset + len(sub) + 1]
        raw = np.frombuffer(sub.buffers()[2], np.uint8)[offs[0] : offs[-1]].reshape(-1, 16)
        nib = _HEX[raw]
        hexok = (nib < 16).all(axis=1)
        # Two nibbles per byte, the 8 bytes read as one big-endian integer: a few whole-array
        # steps instead of sixteen shifts of a uint64 array.
        k = ((nib[:, 0::2] << 4) | (nib[:, 1::2] & 15)).view(">u8").ravel().astype(np.uint64)
        idx = np.flatnonzero(is16)
        keys[idx] = np.where(hexok, k, np.uint64(0))
        ok[idx] = hexok
    return keys, ok


def _hex_keys(ids: pa.Array) -> np.ndarray:
    """uint64 value of 16-hex-digit ImageIDs (validated upstream), vectorised."""
    return _id_keys(ids)[0]


class _IdSet:
    """Membership of ImageIDs in a fixed set, built once (``pc.is_in`` rebuilds its hash table
    per call, which dominated streaming a 1.7M-row index against 650k wanted IDs)."""

    def __init__(self, wanted: pa.Array) -> None:
        self.wanted = wanted.cast(pa.string())
        keys, ok = _id_keys(self.wanted)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.ids = self.wanted.take(pa.array(order)) if len(order) else self.wanted
        # Exact string comparison after the key match; keys equal for different strings
        # (upper/lower case hex) or invalid IDs fall back to pc.is_in.
        self.exact = bool(ok.all()) and (len(self.keys) < 2 or bool((self.keys[1:] != self.keys[:-1]).all()))

    def contains(self, ids: pa.Array) -> np.ndarray:
        if not self.exact:
            return pc.is_in(ids, value_set=self.wanted).to_numpy(zero_copy_only=False)
        keys, ok = _id_keys(ids)
        if not len(self.keys):
            return np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = ok & (self.keys[pos] == keys)
        if hit.any():
            idx = np.flatnonzero(hit)
            same = pc.equal(ids.cast(pa.string()).take(pa.array(idx)), self.ids.take(pa.array(pos[idx])))
            hit[idx] = same.to_numpy(zero_copy_only=False)
        return hit


def _rank(ids: pa.Array, seed: int) -> np.ndarray:
    """A seeded, order-independent pseudo-random rank per image (splitmix64 of the ID)."""
    x = _hex_keys(ids) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _record(
    logm: MalformedLog, stream: _Lines, g0: int, mask: np.ndarray, reason: str, detail_fn: Any
) -> None:
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


def _blank_rows(batch: pa.RecordBatch, stream: _Lines, g0: int, logm: MalformedLog) -> np.ndarray:
    """Rows whose ImageID is empty (blank lines parse as rows of empty fields): counted as missing fields."""
    blank = pc.equal(pc.binary_length(batch.column("ImageID")), 0).to_numpy(zero_copy_only=False)
    if blank.any():
        _record(logm, stream, g0, blank, "missing_fields", lambda i: "empty ImageID (blank line?)")
    return blank


def _valid_ids(ids: pa.Array) -> np.ndarray:
    ok = pc.and_(pc.equal(pc.binary_length(ids), 16), pc.match_substring_regex(ids, r"^[0-9a-fA-F]{16}$"))
    return ok.to_numpy(zero_copy_only=False)


@dataclass
class _Boxes:
    """Selected, validated boxes of one split (columnar)."""

    image_id: pa.Array
    code: np.ndarray  # index into the keep list
    coords: np.ndarray  # (n, 4) float32: xmin, xmax, ymin, ymax
    confidence: np.ndarray
    attrs: np.ndarray  # (n, 5) int8, -1 unknown
    has_attrs: bool
    rows_read: int = 0


def _read_boxes(
    path: Path, display: str, known: pa.Array | None, keep: pa.Array, logm: MalformedLog
) -> _Boxes:
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
    b = _Boxes(
        image_id=ids_all,
        code=np.concatenate(parts["code"]) if parts["code"] else np.zeros(0, np.int32),
        coords=np.concatenate(parts["coords"]) if parts["coords"] else np.zeros((0, 4), np.float32),
        confidence=np.concatenate(parts["conf"]) if parts["conf"] else np.zeros(0, np.float32),
        attrs=np.concatenate(parts["attrs"]) if parts["attrs"] else np.zeros((0, 5), np.int8),
        has_attrs=has_attrs,
        rows_read=rows_read,
    )
    # Exact duplicate rows (same image, class, box, confidence, attributes) are one box.
    dup = duplicate_rows(_hex_keys(b.image_id), b.code, *b.coords.T, b.confidence, *b.attrs.T)
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
        b = _Boxes(
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
    stream: _Lines,
    logm: MalformedLog,
    known: pa.Array | None,
    keep: pa.Array,
    has_attrs: bool,
    parts: dict[str, list],
) -> None:
    """Validate one batch; append its good rows of kept classes to ``parts``."""
    label = batch.column("LabelName")
    blank = _blank_rows(batch, stream, g0, logm)
    if known is not None:
        kidx = pc.index_in(label, value_set=known)
        unknown = kidx.is_null().to_numpy(zero_copy_only=False) & ~blank
        if unknown.any():
            _record(
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
            _record(logm, stream, g0, full, reason, lambda i: detail(pos[i]))
            bad[:] |= m

    rec(~_valid_ids(ids), "bad_image_id", lambda j: f"ImageID {ids[j].as_py()!r} is not 16 hex digits")
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


def _read_image_labels(
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
    lines: _Lines = fast[1] if fast is not None else batches
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
    stream: _Lines,
    logm: MalformedLog,
    known: pa.Array | None,
    keep: pa.Array,
) -> tuple[pa.Array, np.ndarray, np.ndarray] | None:
    label = batch.column("LabelName")
    blank = _blank_rows(batch, stream, g0, logm)
    if known is not None:
        unknown = pc.index_in(label, value_set=known).is_null().to_numpy(zero_copy_only=False) & ~blank
        if unknown.any():
            _record(
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
        bad_id = ~_valid_ids(ids)
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
            _record(logm, stream, g0, full, reason, lambda i, d=det: d)
    good = ~(bad_id | bad_num | oor)
    return (
        ids.filter(pa.array(good)),
        code.filter(pa.array(sel)).to_numpy(zero_copy_only=False)[good].astype(np.int32),
        conf[good].astype(np.float32),
    )


def _read_image_index(
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
    wanted_set = _IdSet(wanted)
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
            _record(logm, stream, g0, full, "non_numeric", lambda i: "OriginalSize is not a byte count")
        if has_rot:
            rot, r_empty, r_bad = parse_floats(sub.column("Rotation"))
            with np.errstate(invalid="ignore"):
                nan = np.isnan(rot)
                r_known = ~(r_empty | r_bad | nan)
                r_invalid = r_known & ~np.isin(rot, (0.0, 90.0, 180.0, 270.0))
            if (r_bad | r_invalid).any():
                full = np.zeros(batch.num_rows, bool)
                full[rows[r_bad | r_invalid]] = True
                _record(logm, stream, g0, full, "bad_rotation", lambda i: "Rotation is not 0, 90, 180 or 270")
            rot_arr = pa.array(
                np.where(r_known & ~r_invalid, rot, 0).astype(np.int32), mask=~(r_known & ~r_invalid)
            )
        else:
            rot_arr = pa.nulls(len(rows), pa.int32())

        def nz(col: pa.Array) -> pa.Array:  # empty string -> null
            return pc.if_else(pc.equal(pc.utf8_length(col), 0), pa.scalar(None, pa.string()), col)

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


def _expansion(keep: list[str], targets_of: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, flat) of selected-class indices each kept code maps to."""
    offs = [0]
    flat: list[int] = []
    for m in keep:
        t = targets_of.get(m, [])
        flat.extend(t)
        offs.append(len(flat))
    return np.asarray(offs, np.int64), np.asarray(flat, np.int32)


def _expand(codes: np.ndarray, offs: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, repeat it once per target: returns (row index, target class index)."""
    counts = offs[codes + 1] - offs[codes]
    rows = np.repeat(np.arange(len(codes)), counts)
    starts = np.repeat(offs[codes], counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, flat[starts + within]


def _shards_and_source_ids(ids_py: list[str], n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`planio.shard_of` and :func:`ids.source_ids` of each ImageID, from one hash per image.

    Both are ``blake2b(ImageID, 8 bytes)`` read big-endian (the shard its remainder, the
    source_id its low 63 bits), so the hash is computed once, not twice per image.
    """
    blake = hashlib.blake2b
    h = np.fromiter(
        (int.from_bytes(blake(i.encode(), digest_size=8).digest(), "big") for i in ids_py),
        np.uint64,
        count=len(ids_py),
    )
    shard = (h % np.uint64(n_shards)).astype(np.int32)
    src = (h & np.uint64((1 << 63) - 1)).astype(np.int64)
    src[src == 0] = 1
    if len(np.unique(src)) != len(src):
        source_ids(ids_py)  # raises DataError naming the colliding ImageIDs
    return shard, src


def _bucket_keys(tmpl: str, split: str, ids: pa.Array, ids_py: list[str] | None) -> pa.Array:
    """``tmpl.format(split=split, image_id=i)`` per image; one vectorised join for the usual
    template where ``{image_id}`` appears once, plainly (``ids_py``: the IDs as a list, or None)."""
    marker = "\x00"
    if tmpl.count("{image_id}") == 1:
        try:
            probe = tmpl.format(split=split, image_id=marker)
        except (KeyError, IndexError, ValueError):
            probe = ""
        if probe.count(marker) == 1:
            pre, post = probe.split(marker)
            return pc.binary_join_element_wise(pa.scalar(pre), ids.cast(pa.string()), pa.scalar(post), "")
    if ids_py is None:
        ids_py = ids.to_pylist()
    return pa.array([tmpl.format(split=split, image_id=i) for i in ids_py], pa.string())


def _shards_and_source_ids_of(
    ids: pa.Array, n_shards: int, chunk: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_shards_and_source_ids` a chunk of IDs at a time (no Python string per image for the
    whole split at once); the source ids are checked for collisions across the whole split."""
    shard = np.zeros(len(ids), np.int32)
    src = np.zeros(len(ids), np.int64)
    for s in range(0, len(ids), chunk):
        part = ids.slice(s, chunk).to_pylist()
        shard[s : s + len(part)], src[s : s + len(part)] = _shards_and_source_ids(part, n_shards)
    if len(np.unique(src)) != len(src):
        source_ids(ids.to_pylist())  # raises DataError naming the colliding ImageIDs
    return shard, src


# --------------------------------------------------------------------------- plan


@dataclass
class _ClassInfo:
    selected: list[str]
    names: dict[str, str]
    known: pa.Array | None
    hierarchy: Hierarchy | None
    ids: np.ndarray | None = None  # label-map id of each selected class (stable across re-plans)


def _load_classes(cfg: Config, inputs: MetadataInputs) -> _ClassInfo:
    src, sel = cfg.source, cfg.selection
    desc: ClassDescriptions | None = None
    hier: Hierarchy | None = None
    trainable: list[str] | None = None
    tnames: dict[str, str] = {}
    if src.class_descriptions:
        desc = read_class_descriptions(inputs.text(src.class_descriptions), src.class_descriptions)
    if src.hierarchy:
        hier = read_hierarchy(inputs.text(src.hierarchy), src.hierarchy)
    if src.trainable_classes:
        text = inputs.text(src.trainable_classes)
        trainable = read_trainable(text, src.trainable_classes)
        tnames = trainable_names(text, src.trainable_classes)
    if sel.expand_hierarchy and hier is None:
        raise ConfigError("selection.expand_hierarchy needs source.hierarchy (the box hierarchy JSON)")
    selected = resolve_classes(
        sel.classes,
        desc,
        hier,
        trainable,
        include_subclasses=sel.include_subclasses,
        trainable_only=sel.trainable_only,
    )
    if not selected:
        raise ConfigError("the selection is empty: no class matches selection.classes / trainable_only")
    known_set: list[str] = []
    seen: set[str] = set()
    for group in ((desc.mids if desc else []), (hier.order if hier else []), (trainable or [])):
        for m in group:
            if m not in seen:
                seen.add(m)
                known_set.append(m)
    known = pa.array(known_set, pa.string()) if known_set else None
    return _ClassInfo(selected, display_names(selected, desc, tnames), known, hier)


def config_digest(cfg: Config) -> str:
    """Digest of the config sections a plan is made from (``oiod status`` compares it)."""
    return _config_digest(cfg)


def _config_digest(cfg: Config) -> str:
    d = {k: cfg.model_dump(mode="json")[k] for k in ("source", "selection", "shards")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _plan_split(
    cfg: Config, split: str, inputs: MetadataInputs, ci: _ClassInfo, storage: Storage, plan_url: str
) -> tuple[planio.SplitManifest, dict[str, Any]]:
    sel = cfg.selection
    ss = cfg.source.splits[split]
    logm = MalformedLog(strict=sel.strict)
    selected = ci.selected
    n_sel = len(selected)
    ids_np = ci.ids if ci.ids is not None else np.arange(1, n_sel + 1, dtype=np.int32)
    sel_index = {m: i for i, m in enumerate(selected)}

    # Box keep-list: selected classes, plus their descendants when boxes are expanded upwards.
    keep = list(selected)
    box_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(selected)}
    lab_keep = list(selected)
    pos_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(selected)}
    neg_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(selected)}
    if sel.expand_hierarchy and ci.hierarchy is not None:
        h = ci.hierarchy
        for m in selected:
            for d in h.descendants(m):
                if d not in box_targets:
                    keep.append(d)
                    box_targets[d] = []
        for m in keep:
            box_targets[m] = sorted(
                set(box_targets[m]) | {sel_index[a] for a in h.ancestors(m) if a in sel_index}
            )
        # Image-level labels: a positive label implies its ancestors, a negative one its descendants.
        for m in selected:
            for other in h.descendants(m) + h.ancestors(m):
                if other not in pos_targets:
                    lab_keep.append(other)
                    pos_targets[other] = []
                    neg_targets[other] = []
        for m in lab_keep:
            own = [sel_index[m]] if m in sel_index else []
            pos_targets[m] = sorted(set(own) | {sel_index[a] for a in h.ancestors(m) if a in sel_index})
            neg_targets[m] = sorted(set(own) | {sel_index[d] for d in h.descendants(m) if d in sel_index})

    # 1. boxes
    bpath = inputs.local(ss.boxes)
    boxes = _read_boxes(bpath, ss.boxes, ci.known, pa.array(keep, pa.string()), logm)
    n_valid = len(boxes.code)

    # 2. filters
    keep_mask = boxes.confidence >= sel.min_confidence
    f = sel.filters
    for k, name in enumerate(_ATTR_FIELDS):
        want = getattr(f, name)
        col = boxes.attrs[:, k]
        if want is not None:
            keep_mask &= (col == int(want)) | ((col == -1) & (not f.drop_unknown))
    filtered_out = int((~keep_mask).sum())
    rows, tgt = _expand(boxes.code[keep_mask], *_expansion(keep, box_targets))
    src_rows = np.flatnonzero(keep_mask)[rows]
    b_ids = boxes.image_id.take(pa.array(src_rows)) if len(src_rows) else pa.array([], pa.string())

    # 3. group by image: unique sorted ids, per-box image position
    uniq = pc.unique(b_ids)
    img_ids = uniq.take(pc.sort_indices(uniq)) if len(uniq) else pa.array([], pa.string())
    b_img = (
        pc.index_in(b_ids, value_set=img_ids).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(b_ids)
        else np.zeros(0, np.int64)
    )
    n_img = len(img_ids)
    per_img = np.bincount(b_img, minlength=n_img)
    candidate = per_img >= max(1, sel.min_boxes_per_image)

    # image-level labels (read before choosing images so min_boxes_per_image=0 can add label-only images)
    lab = None
    if ss.image_labels:
        lpath = inputs.local(ss.image_labels)
        l_ids, l_code, l_conf = _read_image_labels(
            lpath, ss.image_labels, ci.known, pa.array(lab_keep, pa.string()), logm
        )
        positive = l_conf >= 0.5
        r_pos, t_pos = _expand(l_code[positive], *_expansion(lab_keep, pos_targets))
        r_neg, t_neg = _expand(l_code[~positive], *_expansion(lab_keep, neg_targets))
        src = np.concatenate([np.flatnonzero(positive)[r_pos], np.flatnonzero(~positive)[r_neg]])
        tg = np.concatenate([t_pos, t_neg]).astype(np.int32)
        order = np.argsort(src, kind="stable")
        src, tg = src[order], tg[order]
        lab = (l_ids.take(pa.array(src)) if len(src) else pa.array([], pa.string()), tg, l_conf[src])
        if sel.min_boxes_per_image == 0 and len(lab[0]):
            extra = pc.unique(lab[0])
            extra = extra.filter(pc.invert(pc.is_in(extra, value_set=img_ids)))
            if len(extra):
                img_ids = pa.concat_arrays([img_ids, extra])
                order_ids = pc.sort_indices(img_ids).to_numpy()
                img_ids = img_ids.take(pa.array(order_ids))
                inv = np.empty_like(order_ids)
                inv[order_ids] = np.arange(len(order_ids))
                b_img = inv[b_img]
                per_img = np.bincount(b_img, minlength=len(img_ids))
                candidate = np.ones(len(img_ids), bool)
                n_img = len(img_ids)

    # 4. caps, by a seeded rank so the choice does not depend on row order
    chosen = candidate.copy()
    if sel.max_images_per_class is not None or sel.max_images is not None:
        rank = _rank(img_ids, sel.seed)
        if sel.max_images_per_class is not None:
            pairs = np.unique(b_img.astype(np.int64) * n_sel + tgt)
            p_img, p_cls = pairs // n_sel, pairs % n_sel
            m = candidate[p_img]
            p_img, p_cls = p_img[m], p_cls[m]
            order = np.lexsort((rank[p_img], p_cls))
            p_img, p_cls = p_img[order], p_cls[order]
            starts = np.searchsorted(p_cls, p_cls, side="left")
            within = np.arange(len(p_cls)) - starts
            chosen = np.zeros(n_img, bool)
            chosen[p_img[within < sel.max_images_per_class]] = True
        if sel.max_images is not None and chosen.sum() > sel.max_images:
            idx = np.flatnonzero(chosen)
            best = idx[np.argsort(rank[idx], kind="stable")[: sel.max_images]]
            chosen = np.zeros(n_img, bool)
            chosen[best] = True

    # final images and boxes, boxes ordered by image then file order
    new_pos = np.full(n_img, -1, np.int64)
    new_pos[chosen] = np.arange(int(chosen.sum()))
    final_ids = img_ids.filter(pa.array(chosen)) if n_img else img_ids
    n_final = len(final_ids)
    bsel = new_pos[b_img] >= 0 if len(b_img) else np.zeros(0, bool)
    b_pos = new_pos[b_img][bsel]
    order = np.argsort(b_pos, kind="stable")
    b_src = src_rows[bsel][order]
    b_tgt = tgt[bsel][order]
    b_counts = np.bincount(b_pos, minlength=n_final)
    b_offsets = np.concatenate([[0], np.cumsum(b_counts)]).astype(np.int32)
    mids_arr = pa.array(selected, pa.string())
    box_struct = pa.StructArray.from_arrays(
        [
            pa.array(ids_np[b_tgt], pa.int32()),
            mids_arr.take(pa.array(b_tgt.astype(np.int64))) if len(b_tgt) else pa.array([], pa.string()),
            *(pa.array(boxes.coords[b_src, k], pa.float32()) for k in range(4)),
            pa.array(boxes.confidence[b_src], pa.float32()),
            *(pa.array(boxes.attrs[b_src, k], pa.int8()) for k in range(5)),
        ],
        fields=list(planio.BOX_TYPE),
    )

    # image-level labels of the chosen images
    if lab is not None:
        l_pos_f = (
            np.asarray(pc.fill_null(pc.index_in(lab[0], value_set=final_ids), -1))
            if len(lab[0])
            else np.zeros(0, np.int64)
        )
        lm = l_pos_f >= 0
        lp, lt, lc = l_pos_f[lm], lab[1][lm], lab[2][lm]
        # One label per (image, class): a verified positive wins over a negative.
        key = lp.astype(np.int64) * n_sel + lt
        o = np.lexsort((-lc, key))
        key, lp, lt, lc = key[o], lp[o], lt[o], lc[o]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        lp, lt, lc = lp[first], lt[first], lc[first]
        l_counts = np.bincount(lp, minlength=n_final)
        l_offsets = np.concatenate([[0], np.cumsum(l_counts)]).astype(np.int32)
        lab_struct = pa.StructArray.from_arrays(
            [
                pa.array(ids_np[lt], pa.int32()),
                mids_arr.take(pa.array(lt.astype(np.int64))) if len(lt) else pa.array([], pa.string()),
                pa.array(lc, pa.float32()),
            ],
            fields=list(planio.IMAGE_LABEL_TYPE),
        )
        labels_col: tuple[np.ndarray, pa.StructArray] | None = (l_offsets, lab_struct)
        n_labels = len(lt)
    else:
        labels_col = None
        n_labels = 0

    # 5. shards, then the image index routed to buckets of shards, 6. the shards written bucket by bucket
    n_shards = planio.num_shards_for(n_final, cfg.shards.images_per_shard)
    shard, src_ids = _shards_and_source_ids_of(final_ids, n_shards)
    index = None
    if ss.images:
        index = assemble.IndexBuckets(final_ids, shard, n_shards, cfg.shards.images_per_shard, _id_keys)
        try:
            _read_image_index(inputs.local(ss.images), ss.images, final_ids, logm, sink=index.add)
        except BaseException:
            index.close()
            raise
    tmpl = cfg.source.images.key_template
    paths, shas, missing = assemble.write_shards(
        storage,
        plan_url,
        split,
        final_ids,
        shard,
        src_ids,
        n_shards,
        lambda ids: _bucket_keys(tmpl, split, ids, None),
        (b_offsets, box_struct),
        labels_col,
        index,
    )

    # stats
    box_per_cls = np.bincount(b_tgt, minlength=n_sel)
    pairs = np.unique(np.repeat(np.arange(n_final), b_counts).astype(np.int64) * n_sel + b_tgt)
    img_per_cls = np.bincount(pairs % n_sel, minlength=n_sel) if len(pairs) else np.zeros(n_sel, np.int64)
    stats = {
        "images": n_final,
        "boxes": len(b_tgt),
        "image_labels": n_labels,
        "shards": n_shards,
        "rows_read": boxes.rows_read,
        "boxes_valid_selected": n_valid,
        "boxes_filtered_out": filtered_out,
        "images_without_index_row": missing,
        "images_before_caps": int(candidate.sum()),
        "classes": {
            m: {"images": int(img_per_cls[i]), "boxes": int(box_per_cls[i])} for i, m in enumerate(selected)
        },
        "malformed": logm.to_json(),
        "malformed_total": logm.total,
    }
    return planio.SplitManifest(
        num_shards=n_shards, num_images=n_final, num_boxes=len(b_tgt), shards=paths, shard_sha256=shas
    ), stats


def build_plan(cfg: Config, storage: Storage | None = None) -> PlanResult:
    """Parse the configured metadata and write the label map and the plan under ``output.url``.

    Args:
        cfg: the config (``source``, ``selection``, ``shards``, ``output``).
        storage: the storage layer (default: from the config).

    Returns:
        A :class:`PlanResult` with the manifest and the stats.

    Raises:
        ConfigError / UsageError: nothing to plan, or a bad selection (exit 2).
        DataError: an unknown file layout, or a malformed row with ``selection.strict``.
        StorageError: an input or the output cannot be reached.
    """
    st = storage or Storage.from_config(cfg)
    layout = Layout.from_config(cfg)
    with output_lock(st, layout.lock, cfg.output.lock_ttl_s, "plan"):
        return _build_plan(cfg, st, layout)


def _previous_labels(
    cfg: Config, st: Storage, layout: Layout
) -> tuple[LabelMap | None, list[dict], LabelMap | None]:
    """(the output's current label map, classes retired by earlier plans, the pinned map of selection.label_map)."""
    previous: LabelMap | None = None
    retired: list[dict] = []
    try:
        previous = LabelMap.from_pbtxt(st.read_text(layout.label_map_pbtxt), layout.label_map_pbtxt)
        retired = planio.read_manifest(st, layout.plan_dir).removed_classes
    except FileNotFoundError:
        pass
    pinned = None
    if cfg.selection.label_map:
        try:
            pinned = LabelMap.from_pbtxt(st.read_text(cfg.selection.label_map), cfg.selection.label_map)
        except FileNotFoundError:
            raise ConfigError(f"selection.label_map: {cfg.selection.label_map} not found") from None
    return previous, retired, pinned


def _build_plan(cfg: Config, st: Storage, layout: Layout) -> PlanResult:
    t0 = time.monotonic()
    if not cfg.source.splits:
        raise ConfigError("source.splits is empty: configure at least one split's boxes CSV")
    splits = list(cfg.selection.splits) or list(cfg.source.splits)
    plan_url = layout.plan_dir
    inputs = MetadataInputs(cfg, st)
    ci = _load_classes(cfg, inputs)
    previous, retired, pinned = _previous_labels(cfg, st, layout)
    label_map, retired = assign_ids(
        ci.selected,
        ci.names,
        previous=previous,
        retired=retired,
        pinned=pinned,
        pinned_source=cfg.selection.label_map or "selection.label_map",
    )
    ci.ids = np.array([label_map.by_mid[m].id for m in ci.selected], np.int32)
    if previous is not None:
        added = [c for c in label_map if c.mid not in previous.by_mid]
        gone = [c for c in previous if c.mid not in label_map.by_mid]
        if added or gone:

            def few(cs: list) -> str:
                return (
                    ", ".join(f"{c.id}={c.name}" for c in cs[:8])
                    + (f", ... ({len(cs) - 8} more)" if len(cs) > 8 else "")
                ) or "-"

            log.info(
                "label map: %d classes kept their ids, %d added (%s), %d removed, ids retired (%s)",
                len(label_map) - len(added),
                len(added),
                few(added),
                len(gone),
                few(gone),
            )

    # The manifest marks a complete plan: remove it first so a half-rewritten plan is never "done".
    st.delete(layout.plan_manifest)
    split_manifests: dict[str, planio.SplitManifest] = {}
    split_stats: dict[str, Any] = {}
    for split in splits:
        sm, stats = _plan_split(cfg, split, inputs, ci, st, plan_url)
        split_manifests[split] = sm
        split_stats[split] = stats
        log.info(
            "plan %s: %d images, %d boxes, %d shards, %d malformed rows",
            split,
            sm.num_images,
            sm.num_boxes,
            sm.num_shards,
            stats["malformed_total"],
        )

    # Shards left by an earlier plan with other shard counts or splits would confuse readers.
    wanted = {join_url(plan_url, p) for sm in split_manifests.values() for p in sm.shards}
    wanted_norm = {_norm(w) for w in wanted}
    for obj in st.list(plan_url + "/"):
        if obj.url.endswith(".parquet") and _norm(obj.url) not in wanted_norm:
            st.delete(obj.url)

    st.write_text(layout.label_map_pbtxt, label_map.to_pbtxt())
    st.write_text(layout.label_map_csv, label_map.to_csv())
    stats_doc = {
        "splits": split_stats,
        "num_classes": len(label_map),
        "classes": label_map.to_json(),
        "removed_classes": retired,
    }
    st.write_json(layout.plan_stats, stats_doc)
    save_resolved(cfg, plan_url, st)
    manifest = planio.PlanManifest(
        splits=split_manifests,
        num_classes=len(label_map),
        label_map="label_map.pbtxt",
        config_digest=_config_digest(cfg),
        label_map_digest=label_map.digest,
        removed_classes=retired,
        image_settings=image_settings(cfg.image),
    )
    planio.write_manifest(st, plan_url, manifest)
    dt = time.monotonic() - t0
    log.info(
        "plan: %d classes, %s in %.1f s -> %s",
        len(label_map),
        ", ".join(f"{s}={m.num_images} images/{m.num_boxes} boxes" for s, m in split_manifests.items()),
        dt,
        plan_url,
    )
    return PlanResult(plan_url=plan_url, manifest=manifest, stats=stats_doc, label_map=label_map, seconds=dt)


def _norm(url: str) -> str:
    lp = local_path(url)
    return str(lp) if lp is not None else url


def run_plan(cfg: Config) -> PlanResult:
    """CLI entry point for ``oiod plan``: :func:`build_plan` with the config's storage, plus a summary line."""
    result = build_plan(cfg)
    for split, sm in result.manifest.splits.items():
        print(f"{split}: {sm.num_images} images, {sm.num_boxes} boxes, {sm.num_shards} shards")
    print(f"{result.manifest.num_classes} classes; plan written to {result.plan_url}")
    return result
