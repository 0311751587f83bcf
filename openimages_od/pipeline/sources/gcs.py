"""A Google Cloud Storage bucket read natively: ``gs://{source.images.gcs.bucket}/{key_template}``.

Anonymous for public buckets (``anonymous: null`` uses credentials when the
environment has them, else none); ``endpoint_url`` reaches a fake server or a
mirror speaking the GCS JSON API. Reads go through the storage layer's
``gs://`` backend, which retries transient errors in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from openimages_od.pipeline.sources.base import FetchContext, Fetched, ImageSource, check_key_template
from openimages_od.pipeline.sources.bucket import object_key
from openimages_od.storage import GcsOptions

__all__ = ["GcsSource", "GcsSourceOptions"]


class GcsSourceOptions(GcsOptions):
    """``source.images.gcs``: the bucket, its key layout and how to reach it."""

    bucket: str = Field(default="", description="GCS bucket holding the images; required by 'gcs'.")
    key_template: str = Field(
        default="{split}/{image_id}.jpg", description="Object name; fields: split, image_id."
    )

    @field_validator("key_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_key_template(v)

    def storage_options(self) -> GcsOptions:
        """The connection options alone (what the storage layer takes)."""
        return GcsOptions.model_validate(self.model_dump(exclude={"bucket", "key_template"}))


class GcsSource(ImageSource):
    """``gs://{bucket}/{key}`` through the storage layer's GCS backend."""

    name = "gcs"

    def resolve(self, row: Mapping[str, Any]) -> str | None:
        opts = self.sources.gcs
        if not opts.bucket:
            return None
        return f"gs://{opts.bucket}/{object_key(opts.key_template, row['split'], row['image_id'])}"

    async def fetch(self, url: str, ctx: FetchContext) -> Fetched:
        return await ctx.read_object(self.name, url, "gcs")
