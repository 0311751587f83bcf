"""The public Open Images bucket (or an S3 mirror): ``s3://{bucket}/{key_template}``.

:func:`object_key` is the one owner of an image's object key: the plan's
``bucket_key`` column is written with :func:`object_keys` and the fetcher reads
the key :func:`object_key` gives, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.pipeline.sources.base import FetchContext, Fetched, ImageSource

__all__ = ["BucketSource", "object_key", "object_keys"]


def object_key(template: str, split: str, image_id: str) -> str:
    """The object key of one image under ``template`` (``{split}`` and ``{image_id}``), no leading ``/``.

    Args:
        template: a key template validated by :func:`~.base.check_key_template`.
        split: the split name.
        image_id: the Open Images ImageID.
    """
    return template.format(split=split, image_id=image_id).lstrip("/")


def object_keys(template: str, split: str, image_ids: pa.Array) -> pa.Array:
    """:func:`object_key` for many images, as a string array.

    One vectorised join when ``{image_id}`` appears once, plainly, in the template (the usual
    case, millions of rows); a per-row format otherwise. Both give exactly :func:`object_key`.
    """
    ids = image_ids.cast(pa.string())
    marker = "\x00"
    if template.count("{image_id}") == 1:
        probe = object_key(template, split, marker)
        # A key starting at {image_id} would also lose an ID's leading "/": the exact path handles it.
        leading_slash = probe.startswith(marker) and len(ids) and pc.any(pc.starts_with(ids, "/")).as_py()
        if probe.count(marker) == 1 and not leading_slash:
            pre, post = probe.split(marker)
            return pc.binary_join_element_wise(pa.scalar(pre), ids, pa.scalar(post), "")
    return pa.array([object_key(template, split, i) for i in ids.to_pylist()], pa.string())


class BucketSource(ImageSource):
    """``s3://{source.images.bucket}/{key}`` read through the storage layer (``source.images.s3``)."""

    name = "bucket"

    def resolve(self, row: Mapping[str, Any]) -> str | None:
        key = object_key(self.sources.key_template, row["split"], row["image_id"])
        return f"s3://{self.sources.bucket}/{key}"

    async def fetch(self, url: str, ctx: FetchContext) -> Fetched:
        return await ctx.read_object(self.name, url, "s3")
