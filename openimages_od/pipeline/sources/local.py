"""Images in a local directory or a mounted volume (a PVC, NFS, a FUSE mount of a bucket).

``source.images.local.root`` is the directory (a path or ``file://`` URL);
``source.images.local.key_template`` places each image under it, by default
``{split}/{image_id}.jpg``, the layout of the public bucket, so a copy made
with ``aws s3 sync s3://open-images-dataset/validation /data/validation``
works unchanged.

Image IDs come from metadata files, which may be hostile: a key with an empty,
``.`` or ``..`` segment, a backslash or a control character is refused
(``bad_key``) before any file is opened, so no ID can reach a file outside the
root. Symbolic links inside the root are followed: the volume is the
operator's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openimages_od.pipeline.sources.base import (
    FetchContext,
    Fetched,
    FetchFailed,
    ImageSource,
    check_key_template,
)
from openimages_od.storage import local_path

__all__ = ["LocalSource", "LocalSourceOptions", "safe_relative_key"]


class LocalSourceOptions(BaseModel):
    """``source.images.local``: a directory of images."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    root: str = Field(
        default="", description="Directory (path or file:// URL) holding the images; required by 'local'."
    )
    key_template: str = Field(
        default="{split}/{image_id}.jpg", description="Path of an image under root; fields: split, image_id."
    )

    @field_validator("root")
    @classmethod
    def _local_root(cls, v: str) -> str:
        if v and local_path(v) is None:
            raise ValueError(
                f"must be a local directory or file:// URL (got {v[:200]!r}); use 'bucket' or 'gcs'"
            )
        return v

    @field_validator("key_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_key_template(v)


def safe_relative_key(key: str) -> str:
    """``key`` if it stays inside the directory it is joined to.

    Raises:
        FetchFailed: ``bad_key`` for an absolute key, an empty, ``.`` or ``..`` segment, a
            backslash or a control character.
    """
    if not key or key.startswith("/"):
        raise FetchFailed("bad_key", f"{key[:200]!r} is not a relative path")
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in key):
        raise FetchFailed("bad_key", f"{key[:200]!r} has a backslash or a control character")
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        raise FetchFailed("bad_key", f"{key[:200]!r} has an empty, '.' or '..' path segment")
    return key


class LocalSource(ImageSource):
    """``{root}/{key}`` read through the storage layer's local backend."""

    name = "local"

    def resolve(self, row: Mapping[str, Any]) -> str | None:
        opts = self.sources.local
        if not opts.root:
            return None
        # No lstrip of "/" here (unlike the bucket): a key template yielding an absolute path is refused.
        key = opts.key_template.format(split=row["split"], image_id=row["image_id"])
        root = local_path(opts.root)
        assert root is not None  # checked by the config
        return str(root / safe_relative_key(key))

    async def fetch(self, url: str, ctx: FetchContext) -> Fetched:
        return await ctx.read_object(self.name, url, "local")
