"""Metadata inputs: URLs of the Open Images CSV/JSON files resolved to local files.

Remote inputs (``http(s)://``, ``s3://``) are downloaded once and cached under
``{output}/metadata/`` (for an ``s3://`` output: a local cache, with a copy uploaded there so
any machine can reuse it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from openimages_od.config import Config, join_url
from openimages_od.errors import DataError
from openimages_od.storage import Storage, local_path

__all__ = ["MetadataInputs"]


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
        """The UTF-8 text of ``url`` (a BOM dropped)."""
        data = self.local(url).read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{url}: not UTF-8 text ({exc})") from None
