"""The plan row's own URLs: ``original`` (OriginalURL, usually Flickr) and ``thumbnail`` (Thumbnail300KURL)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openimages_od.pipeline.sources.base import FetchContext, Fetched, ImageSource

__all__ = ["OriginalSource", "ThumbnailSource"]


class _RowUrlSource(ImageSource):
    """An http(s) URL stored in one plan-row column, fetched with the HTTP retry policy."""

    column: str = ""

    def resolve(self, row: Mapping[str, Any]) -> str | None:
        return row.get(self.column) or None

    async def fetch(self, url: str, ctx: FetchContext) -> Fetched:
        return await ctx.http_get(self.name, url)


class OriginalSource(_RowUrlSource):
    """The image's ``OriginalURL`` (full size; hosts come and go)."""

    name = "original"
    column = "original_url"


class ThumbnailSource(_RowUrlSource):
    """The image's ``Thumbnail300KURL`` (about 300k pixels; not every image has one)."""

    name = "thumbnail"
    column = "thumbnail_url"
