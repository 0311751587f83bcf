"""One image's CPU work: verify, orient, resize, encode, and build its tf.Example.

Pure functions of the image section of the config (:class:`ImageConfig`), the
plan row and the fetched bytes; they run in a worker's CPU thread pool and
never touch storage, the network or Ray.
"""

from __future__ import annotations

import hashlib
from typing import Any

from openimages_od.config import ImageConfig
from openimages_od.pipeline.cache import CacheEntry
from openimages_od.pipeline.example import detection_features, encode_example
from openimages_od.pipeline.fetch import Fetched
from openimages_od.pipeline.geometry import Op, render, transform_boxes
from openimages_od.pipeline.ledger import LedgerEntry
from openimages_od.pipeline.verify import check_md5, open_image

__all__ = ["process_image", "record_from", "transform_image"]


def record_from(
    row: dict[str, Any], data: bytes, width: int, height: int, ops: list[Op], digest: str | None = None
) -> bytes:
    """The tf.Example of a plan row from its final image bytes (the same for a fetch and a cache hit).

    Args:
        row: The plan row (its ``boxes`` are in source-image coordinates).
        data: The final JPEG bytes.
        width: Final width in pixels.
        height: Final height in pixels.
        ops: The geometric operations applied to the source image, in order.
        digest: ``data``'s sha256 (hex) when the caller has it (checked or computed), else computed here.

    Returns:
        The serialized tf.Example.
    """
    src_boxes = [(b["xmin"], b["xmax"], b["ymin"], b["ymax"]) for b in (row.get("boxes") or [])]
    boxes = transform_boxes(src_boxes, ops)
    if digest is None:
        digest = hashlib.sha256(data).hexdigest()
    return encode_example(detection_features(row, data, width, height, boxes, digest))


def process_image(fetched: Fetched, row: dict[str, Any], ic: ImageConfig) -> tuple[bytes, LedgerEntry]:
    """Verify, orient, resize and encode one fetched image (CPU; runs in a thread).

    Args:
        fetched: The source bytes and where they came from.
        row: The plan row.
        ic: The ``image`` section of the config.

    Returns:
        (serialized tf.Example, ledger entry).

    Raises:
        Rejected: the bytes are not usable (reason in ``.reason``).
    """
    record, entry, _ = transform_image(fetched, row, ic)
    return record, entry


def transform_image(
    fetched: Fetched, row: dict[str, Any], ic: ImageConfig
) -> tuple[bytes, LedgerEntry, CacheEntry]:
    """:func:`process_image` plus the image cache entry it makes.

    Raises:
        Rejected: the bytes are not usable (reason in ``.reason``).
    """
    if fetched.source == "original" and ic.verify_md5:
        check_md5(fetched.data, row.get("original_md5"))
    img = open_image(
        fetched.data, max_pixels=ic.max_pixels, min_side=ic.min_side, reject_placeholder=ic.reject_placeholder
    )
    out = render(
        img,
        fetched.data,
        rotation=row.get("rotation"),
        max_side=ic.max_side,
        quality=ic.quality,
        exif_mode=ic.exif,
        keep_original_if_fits=ic.keep_original_if_fits,
        resample=ic.resample,
    )
    digest = hashlib.sha256(out.data).hexdigest()
    record = record_from(row, out.data, out.width, out.height, out.ops, digest)
    entry = LedgerEntry(
        image_id=row["image_id"],
        status="ok",
        source=fetched.source,
        url=fetched.url,
        bytes=len(fetched.data),
        width=out.width,
        height=out.height,
        kept_original=out.kept_original,
    )
    cached = CacheEntry(
        image_id=row["image_id"],
        status="ok",
        rotation=row.get("rotation"),
        original_md5=row.get("original_md5"),
        source=fetched.source,
        url=fetched.url,
        bytes=len(fetched.data),
        width=out.width,
        height=out.height,
        kept_original=out.kept_original,
        ops=[int(o.value) for o in out.ops],
        data=out.data,
        sha256=digest,
    )
    return record, entry, cached
