"""The last step of a split's plan: join the image index and write the Parquet shards, in bounded memory.

The image index is the heavy part of a plan (URLs, MD5s: ~180 bytes per image,
1.2 GB for the 6.5M images a 10x-size V6 selection keeps), and a whole-split
table built from it used to be copied once more per shard. Here the shards are
written in groups ("buckets") of consecutive shard numbers:

* the index rows of the selected images are routed, batch by batch as the
  index streams past, to their bucket: kept in memory when the split fits one
  bucket (the common case; nothing is spilled), otherwise appended to one Arrow
  IPC file per bucket in a temporary directory;
* each bucket is joined with its index rows once, then its table is built in
  pieces of :data:`SHARDS_PER_PIECE` shards, already in shard order (images
  sorted by shard, then by ImageID), so every shard is a zero-copy slice of a
  piece; the pool writes one piece's shards while the next piece is built.

Rows within a bucket keep file order, so "the first index row of an image wins"
holds exactly as for a whole-file join. The shards written are the same rows in
the same order as a whole-split join would give.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from openimages_od.config import join_url
from openimages_od.openimages import planio
from openimages_od.openimages.idkeys import IdSet

__all__ = ["IMAGES_PER_BUCKET", "INDEX_SCHEMA", "IndexBuckets", "write_bucketed"]

# Images per bucket: the index rows of this many images (~180 MB) and their plan table are what
# memory holds at a time; below it a split is one bucket, in memory, as before.
IMAGES_PER_BUCKET = 1_000_000
# Shards whose table is built at a time: the pool writes one piece while the next is built.
SHARDS_PER_PIECE = 32

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("original_url", pa.string()),
        ("thumbnail_url", pa.string()),
        ("original_md5", pa.string()),
        ("original_size", pa.int64()),
        ("rotation", pa.int32()),
    ]
)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for each (start, count), vectorised."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts.astype(np.int64) - (np.cumsum(counts) - counts), counts)
    return shift + np.arange(total, dtype=np.int64)


class IndexBuckets:
    """Index rows of a split's selected images, grouped by the bucket of shards their image falls in.

    Args:
        final_ids: the split's images, sorted (the plan's image order).
        shard: the shard of each image, or a function giving it (called only when the split
            needs more than one bucket, so the hashing can run beside a one-bucket index read).
        n_shards: shards in the split.
        images_per_shard: from the config (sets how many shards make a bucket).
        id_keys: ``ImageID -> (uint64 key, ok)`` (exact for 16-hex-digit IDs).
        images_per_bucket: bucket size in images (default :data:`IMAGES_PER_BUCKET`).
    """

    def __init__(
        self,
        final_ids: pa.Array,
        shard: np.ndarray | Callable[[], np.ndarray],
        n_shards: int,
        images_per_shard: int,
        id_keys: Callable[[pa.Array], tuple[np.ndarray, np.ndarray]],
        images_per_bucket: int | None = None,
    ) -> None:
        images_per_bucket = images_per_bucket or IMAGES_PER_BUCKET
        self.shards_per_bucket = max(1, images_per_bucket // max(1, images_per_shard))
        self.n_buckets = max(1, -(-n_shards // self.shards_per_bucket))
        self._id_keys = id_keys
        self._mem: list[pa.Table] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._writers: dict[int, Any] = {}
        self._keys = np.zeros(0, np.uint64)
        self._bucket_of = np.zeros(0, np.int32)
        if self.n_buckets == 1:
            return
        keys, ok = id_keys(final_ids)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        shards = shard() if callable(shard) else shard
        self._bucket_of = (shards[order] // self.shards_per_bucket).astype(np.int32)
        unique = len(self._keys) < 2 or bool((self._keys[1:] != self._keys[:-1]).all())
        if not (bool(ok.all()) and unique):
            # IDs that are not plain 16-hex-digit keys (or equal as keys) cannot be routed by
            # key: keep everything in one bucket, in memory, as for a small split.
            self.shards_per_bucket, self.n_buckets = n_shards or 1, 1

    def add(self, table: pa.Table) -> None:
        """Take one index batch's rows of selected images (file order), :data:`INDEX_SCHEMA`."""
        table = table.cast(INDEX_SCHEMA) if table.schema != INDEX_SCHEMA else table
        if self.n_buckets == 1:
            self._mem.append(table)
            return
        keys, _ = self._id_keys(table.column("image_id").combine_chunks())
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        bucket = self._bucket_of[pos]
        order = np.argsort(bucket, kind="stable")  # file order within each bucket
        bounds = np.searchsorted(bucket[order], np.arange(self.n_buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            rows = table.take(pa.array(order[bounds[b] : bounds[b + 1]]))
            self._writer(int(b)).write_table(rows)

    def _writer(self, b: int) -> Any:
        if b not in self._writers:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="oiod-plan-index-")
            path = Path(self._tmp.name) / f"bucket-{b}.arrow"
            self._writers[b] = pa.ipc.new_stream(pa.OSFile(str(path), "wb"), INDEX_SCHEMA)
        return self._writers[b]

    def table(self, b: int) -> pa.Table:
        """The index rows of bucket ``b``, in file order."""
        if self.n_buckets == 1:
            mem, self._mem = self._mem, []  # handed over: the caller's copy is the only one
            return pa.concat_tables(mem) if mem else INDEX_SCHEMA.empty_table()
        w = self._writers.pop(b, None)
        if w is None:
            return INDEX_SCHEMA.empty_table()
        w.close()
        assert self._tmp is not None
        path = Path(self._tmp.name) / f"bucket-{b}.arrow"
        with pa.OSFile(str(path), "rb") as fh:
            t = pa.ipc.open_stream(fh).read_all()
        path.unlink()
        return t

    def close(self) -> None:
        """Drop anything spilled."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._mem = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def write_bucketed(
    storage: Any,
    plan_url: str,
    split: str,
    final_ids: pa.Array,
    shard: np.ndarray,
    source_id: np.ndarray,
    n_shards: int,
    bucket_key: Callable[[pa.Array], pa.Array],
    boxes: tuple[np.ndarray, pa.StructArray],
    labels: tuple[np.ndarray, pa.StructArray] | None,
    index: IndexBuckets | None,
) -> tuple[list[str], list[str], int]:
    """Build and write the split's shards, one bucket of shards at a time.

    Args:
        storage: the storage layer.
        plan_url: where the plan goes.
        split: the split's name.
        final_ids: the split's images, sorted.
        shard: the shard of each image.
        source_id: the source id of each image.
        n_shards: shards in the split (some may be empty).
        bucket_key: ImageIDs -> their bucket keys.
        boxes: ``(offsets, structs)``: image ``i``'s boxes are ``structs[offsets[i]:offsets[i+1]]``.
        labels: the same for image-level labels, or None (no labels file: null lists).
        index: the routed index rows, or None (no index file: null columns).

    Returns:
        ``(shard paths, their sha256, images without an index row)``.
    """
    paths = [planio.plan_shard_path(split, i, n_shards) for i in range(n_shards)]
    shas: list[str] = [""] * n_shards
    s_order = np.argsort(shard, kind="stable")  # by shard, then by image (the images are sorted)
    bounds = np.searchsorted(shard[s_order], np.arange(n_shards + 1))
    spb = index.shards_per_bucket if index is not None else max(1, n_shards)
    missing = 0
    # Parquet encoding and the fsync of each shard release the GIL: a few threads overlap them,
    # and with the building of the next piece's table on the main thread.
    with ThreadPoolExecutor(max_workers=max(1, min(4, n_shards))) as pool:
        for first in range(0, n_shards, spb):
            last = min(n_shards, first + spb)
            lo, hi = int(bounds[first]), int(bounds[last])
            pos = s_order[lo:hi]
            ids = final_ids.take(pa.array(pos)) if len(pos) else final_ids.slice(0, 0)
            itab, where = None, None
            if index is not None:
                # One contiguous table per bucket: a take from a chunked column concatenates
                # every chunk first, once per call (it was most of the writing time).
                itab = index.table(first // spb).combine_chunks()
                if len(itab) and len(ids):
                    # Index row of each image (null: none); the first row of an ImageID wins.
                    row = IdSet(itab.column("image_id").chunk(0)).index_of(ids)
                    where = pa.array(row, pa.int64(), mask=row < 0)
                missing += int(where.null_count) if where is not None else len(ids)
            else:
                missing += len(ids)
            pending = []
            for p_first in range(first, last, SHARDS_PER_PIECE):
                p_last = min(last, p_first + SHARDS_PER_PIECE)
                a, b = int(bounds[p_first]) - lo, int(bounds[p_last]) - lo
                table = _piece_table(
                    pos[a:b],
                    ids.slice(a, b - a),
                    where.slice(a, b - a) if where is not None else None,
                    itab,
                    split,
                    shard,
                    source_id,
                    bucket_key,
                    boxes,
                    labels,
                )

                def write(i: int, table: pa.Table = table, p_lo: int = lo + a) -> tuple[int, str]:
                    rows = table.slice(int(bounds[i]) - p_lo, int(bounds[i + 1] - bounds[i]))
                    return i, planio.write_plan_table(storage, join_url(plan_url, paths[i]), rows)

                pending += [pool.submit(write, i) for i in range(p_first, p_last)]
            # A bucket's writes finish before the next bucket is read: memory holds one bucket.
            for fut in pending:
                i, sha = fut.result()
                shas[i] = sha
    if index is not None:
        index.close()
    return paths, shas, missing


def _piece_table(
    pos: np.ndarray,
    ids: pa.Array,
    where: pa.Array | None,
    itab: pa.Table | None,
    split: str,
    shard: np.ndarray,
    source_id: np.ndarray,
    bucket_key: Callable[[pa.Array], pa.Array],
    boxes: tuple[np.ndarray, pa.StructArray],
    labels: tuple[np.ndarray, pa.StructArray] | None,
) -> pa.Table:
    """The plan rows of the images at positions ``pos`` (their ``ids``, in that order).

    ``where`` is each image's row in ``itab`` (null where it has none), or None: no index rows.
    """
    n = len(pos)

    def lists(col: tuple[np.ndarray, pa.StructArray]) -> pa.Array:
        offsets, structs = col
        counts = offsets[pos + 1] - offsets[pos]
        rows = _ranges(offsets[pos], counts)
        new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(new_offsets), structs.take(pa.array(rows)))

    def icol(name: str, typ: pa.DataType) -> Any:
        if where is None or itab is None:
            return pa.nulls(n, typ)
        return itab.column(name).take(where)  # a null index gives a null value

    table = pa.table(
        {
            "image_id": ids,
            "split": pa.repeat(pa.scalar(split, pa.string()), n),
            "shard": pa.array(shard[pos], pa.int32()),
            "source_id": pa.array(source_id[pos], pa.int64()),
            "bucket_key": bucket_key(ids),
            "original_url": icol("original_url", pa.string()),
            "thumbnail_url": icol("thumbnail_url", pa.string()),
            "original_md5": icol("original_md5", pa.string()),
            "original_size": icol("original_size", pa.int64()),
            "rotation": icol("rotation", pa.int32()),
            "boxes": lists(boxes),
            "image_labels": lists(labels)
            if labels is not None
            else pa.nulls(n, pa.list_(planio.IMAGE_LABEL_TYPE)),
        },
        schema=planio.PLAN_SCHEMA,
    )
    return table
