"""Writing a split's plan: the image index joined, shards assigned, Parquet shards written.

Steps 5 and 6 of a split's plan (see :mod:`~openimages_od.openimages.splitplan`).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.config import join_url
from openimages_od.openimages import planio
from openimages_od.openimages.formats import MalformedLog
from openimages_od.openimages.ids import source_ids
from openimages_od.openimages.readimages import read_image_index
from openimages_od.storage import Storage

__all__ = ["bucket_keys", "image_index_columns", "shards_and_source_ids", "write_shards"]

INDEX_COLUMNS = (
    ("original_url", pa.string()),
    ("thumbnail_url", pa.string()),
    ("original_md5", pa.string()),
    ("original_size", pa.int64()),
    ("rotation", pa.int32()),
)


def image_index_columns(
    path: Path | None, display: str, final_ids: pa.Array, logm: MalformedLog
) -> tuple[dict[str, pa.Array], int]:
    """The image-index columns of ``final_ids`` (null where an image has no index row) and how
    many images have none; ``path`` None (no index configured): all null."""
    n_final = len(final_ids)
    if path is None:
        return {name: pa.nulls(n_final, typ) for name, typ in INDEX_COLUMNS}, n_final
    index = read_image_index(path, display, final_ids, logm)
    where = pc.index_in(final_ids, value_set=index.column("image_id"))
    missing = int(where.null_count)
    if not len(index):
        return {name: pa.nulls(n_final, typ) for name, typ in INDEX_COLUMNS}, missing
    take = pc.fill_null(where, 0)
    cols = {}
    for name, typ in INDEX_COLUMNS:
        col = index.column(name).combine_chunks().take(take)
        cols[name] = pc.if_else(where.is_valid(), col, pa.scalar(None, typ))
    return cols, missing


def shards_and_source_ids(ids_py: list[str], n_shards: int) -> tuple[np.ndarray, np.ndarray]:
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


def bucket_keys(tmpl: str, split: str, ids: pa.Array, ids_py: list[str]) -> pa.Array:
    """The object key of each image: the bucket source's :func:`object_keys` owns the rule."""
    from openimages_od.pipeline.sources.bucket import object_keys

    return object_keys(tmpl, split, ids)


def write_shards(
    storage: Storage,
    plan_url: str,
    split: str,
    final_ids: pa.Array,
    key_template: str,
    index_cols: dict[str, pa.Array],
    boxes_col: pa.Array,
    labels_col: pa.Array,
    images_per_shard: int,
) -> tuple[list[str], list[str]]:
    """Assign each image its shard and write the split's Parquet plan shards.

    Returns:
        (the shards' paths relative to ``plan_url``, their sha256 digests).
    """
    n_final = len(final_ids)
    ids_py = final_ids.to_pylist()
    n_shards = planio.num_shards_for(n_final, images_per_shard)
    shard, src_ids = shards_and_source_ids(ids_py, n_shards)
    table = pa.table(
        {
            "image_id": final_ids,
            "split": pa.array([split] * n_final, pa.string()),
            "shard": pa.array(shard, pa.int32()),
            "source_id": pa.array(src_ids, pa.int64()),
            "bucket_key": bucket_keys(key_template, split, final_ids, ids_py),
            **index_cols,
            "boxes": boxes_col,
            "image_labels": labels_col,
        },
        schema=planio.PLAN_SCHEMA,
    )
    s_order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[s_order], np.arange(n_shards + 1))
    paths = [planio.plan_shard_path(split, i, n_shards) for i in range(n_shards)]

    def write(i: int) -> str:
        # Each shard's rows taken from the table as it is written: no sorted copy of the whole plan.
        return planio.write_plan_table(
            storage, join_url(plan_url, paths[i]), table.take(pa.array(s_order[bounds[i] : bounds[i + 1]]))
        )

    # Parquet encoding and the fsync of each shard release the GIL: a few threads overlap them.
    with ThreadPoolExecutor(max_workers=min(4, n_shards)) as pool:
        shas = list(pool.map(write, range(n_shards)))
    return paths, shas
