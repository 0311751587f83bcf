"""Writing a split's plan: shards assigned, the image index joined, Parquet shards written.

Steps 5 and 6 of a split's plan (see :mod:`~openimages_od.openimages.splitplan`); the bounded-memory
join and the bucket-by-bucket writes are in :mod:`~openimages_od.openimages.assemble`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from openimages_od.openimages import assemble, planio
from openimages_od.openimages.formats import MalformedLog
from openimages_od.openimages.idhash import blake2b8_keys
from openimages_od.openimages.idkeys import id_keys, sorted_unique
from openimages_od.openimages.ids import source_ids
from openimages_od.openimages.readimages import read_image_index
from openimages_od.storage import Storage

__all__ = ["bucket_keys", "shards_and_source_ids", "shards_and_source_ids_of", "write_shards"]

INDEX_COLUMNS = (
    ("original_url", pa.string()),
    ("thumbnail_url", pa.string()),
    ("original_md5", pa.string()),
    ("original_size", pa.int64()),
    ("rotation", pa.int32()),
)


def shards_and_source_ids(ids_py: list[str], n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`planio.shard_of` and :func:`ids.source_ids` of each ImageID, from one hash per image.

    Both are ``blake2b(ImageID, 8 bytes)`` read big-endian (the shard its remainder, the
    source_id its low 63 bits), so the hash is computed once, not twice per image.
    """
    blake = hashlib.blake2b
    digests = b"".join(map(lambda i: blake(i.encode(), digest_size=8).digest(), ids_py))
    shard, src = _shard_and_source(np.frombuffer(digests, ">u8").astype(np.uint64), n_shards)
    _check_unique(src, lambda: ids_py)
    return shard, src


def _shard_and_source(h: np.ndarray, n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard (the remainder) and source id (the low 63 bits, 0 made 1) of each digest."""
    shard = (h % np.uint64(n_shards)).astype(np.int32)
    src = (h & np.uint64((1 << 63) - 1)).astype(np.int64)
    src[src == 0] = 1
    return shard, src


def _check_unique(src: np.ndarray, ids_py: Callable[[], list[str]]) -> None:
    """Raise :class:`DataError` naming the colliding ImageIDs if two source ids are equal (the
    IDs are listed only then)."""
    if len(sorted_unique(src)) != len(src):
        source_ids(ids_py())  # raises DataError naming the colliding ImageIDs


def bucket_keys(tmpl: str, split: str, ids: pa.Array, ids_py: list[str] | None) -> pa.Array:
    """The object key of each image: the bucket source's :func:`object_keys` owns the rule."""
    from openimages_od.pipeline.sources.bucket import object_keys

    return object_keys(tmpl, split, ids)


# Below this many images hashlib is done before numba would have loaded the compiled hash.
COMPILED_HASH_MIN = 20_000


def shards_and_source_ids_of(
    ids: pa.Array, n_shards: int, chunk: int = 200_000, compiled_min: int = COMPILED_HASH_MIN
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shards_and_source_ids` of a whole column: compiled over the Arrow buffers
    (:func:`~openimages_od.openimages.idhash.blake2b8_keys`, no GIL) or, where that cannot answer,
    with hashlib a chunk of IDs at a time; the source ids are checked for collisions across the
    whole split."""
    h = blake2b8_keys(ids) if len(ids) >= compiled_min else None
    if h is not None:
        shard, src = _shard_and_source(h, n_shards)
    else:
        shard = np.zeros(len(ids), np.int32)
        src = np.zeros(len(ids), np.int64)
        for s in range(0, len(ids), chunk):
            part = ids.slice(s, chunk).to_pylist()
            shard[s : s + len(part)], src[s : s + len(part)] = shards_and_source_ids(part, n_shards)
    _check_unique(src, ids.to_pylist)
    return shard, src


def write_shards(
    storage: Storage,
    plan_url: str,
    split: str,
    final_ids: pa.Array,
    key_template: str,
    index: tuple[Path, str] | None,
    logm: MalformedLog,
    boxes_col: pa.Array,
    labels_col: pa.Array,
    images_per_shard: int,
) -> tuple[list[str], list[str], int]:
    """Assign each image its shard, join the image index and write the split's Parquet plan shards.

    The index is streamed once, its rows of ``final_ids`` routed to buckets of shards
    (:class:`~openimages_od.openimages.assemble.IndexBuckets`), and the shards are built and
    written a bucket at a time (:func:`~openimages_od.openimages.assemble.write_bucketed`).

    Args:
        storage: the storage layer.
        plan_url: the plan directory.
        split: the split's name.
        final_ids: the chosen images, sorted.
        key_template: ``source.images.key_template``.
        index: ``(local path, display name)`` of the image index, or None (none configured).
        logm: where malformed index rows are recorded.
        boxes_col: the ``boxes`` list column (one list per image of ``final_ids``).
        labels_col: the ``image_labels`` list column (all null without a labels file).
        images_per_shard: from the config.

    Returns:
        (the shards' paths relative to ``plan_url``, their sha256 digests, images without an index row).
    """
    n_final = len(final_ids)
    n_shards = planio.num_shards_for(n_final, images_per_shard)
    buckets = None
    # One blake2b per image (compiled, without the GIL: ~0.2 s for 650k images) on a thread
    # while the index streams through pyarrow's parser: the two overlap.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashed = pool.submit(shards_and_source_ids_of, final_ids, n_shards)
        if index is not None:
            buckets = assemble.IndexBuckets(
                final_ids, lambda: hashed.result()[0], n_shards, images_per_shard, id_keys
            )
            try:
                read_image_index(index[0], index[1], final_ids, logm, sink=buckets.add)
            except BaseException:
                buckets.close()
                raise
        shard, src_ids = hashed.result()
    labels = None if n_final and labels_col.null_count == n_final else _lists(labels_col)
    return assemble.write_bucketed(
        storage,
        plan_url,
        split,
        final_ids,
        shard,
        src_ids,
        n_shards,
        lambda ids: bucket_keys(key_template, split, ids, None),
        _lists(boxes_col),
        labels,
        buckets,
    )


def _lists(col: pa.Array) -> tuple[np.ndarray, pa.StructArray]:
    """(offsets, values) of a list column without nulls."""
    return np.asarray(col.offsets, np.int64), col.values
