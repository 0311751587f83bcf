"""Find and fetch training checkpoints in a local or remote ``model_dir``.

TF's ``checkpoint`` index file names the latest checkpoint (``ckpt-N``); a
checkpoint is ``ckpt-N.index`` plus ``ckpt-N.data-*``. For a remote
``model_dir`` only the files of the wanted checkpoint are downloaded, into a
local cache. No TensorFlow import here.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from openimages_od.config import Config, join_url
from openimages_od.errors import DataError
from openimages_od.storage import Storage, local_path

__all__ = ["checkpoint_step", "fetch_checkpoint", "latest_checkpoint_url", "resolve_checkpoint"]

_LATEST_RE = re.compile(r'^model_checkpoint_path:\s*"([^"]+)"', re.M)


def checkpoint_step(path: str) -> int | None:
    """The global step encoded in a checkpoint prefix (``.../ckpt-1200`` -> 1200)."""
    m = re.search(r"-(\d+)$", path.rstrip("/"))
    return int(m.group(1)) if m else None


def latest_checkpoint_url(model_dir: str, storage: Storage) -> str | None:
    """URL prefix of the latest checkpoint in ``model_dir`` (None when there is none yet)."""
    try:
        text = storage.read_text(join_url(model_dir, "checkpoint"))
    except FileNotFoundError:
        return None
    m = _LATEST_RE.search(text)
    if not m:
        return None
    name = m.group(1)
    if name.startswith("/") or "://" in name:
        # An absolute path written on another machine: keep only the name.
        name = name.rstrip("/").rsplit("/", 1)[-1]
    return join_url(model_dir, name)


def fetch_checkpoint(prefix_url: str, storage: Storage, cache_dir: Path | None = None) -> str:
    """A local checkpoint prefix for ``prefix_url`` (downloading ``.index`` and ``.data-*`` if remote).

    Raises:
        DataError: the checkpoint files do not exist.
    """
    lp = local_path(prefix_url)
    if lp is not None:
        if not Path(str(lp) + ".index").is_file():
            raise DataError(f"checkpoint not found: {prefix_url} (no {lp}.index)")
        return str(lp)
    p = urlparse(prefix_url)
    base = cache_dir or Path(tempfile.gettempdir()) / "oiod-ckpt-cache"
    dest_prefix = base / p.netloc / p.path.lstrip("/")
    files = [
        o
        for o in storage.list(prefix_url + ".")
        if o.url.endswith(".index") or ".data-" in o.url.rsplit("/", 1)[-1]
    ]
    if not any(o.url.endswith(".index") for o in files):
        raise DataError(f"checkpoint not found: {prefix_url} (no .index object)")
    for o in files:
        dest = Path(str(dest_prefix) + o.url[len(prefix_url) :])
        if not (dest.is_file() and dest.stat().st_size == o.size):
            storage.download_file(o.url, dest)
    return str(dest_prefix)


def resolve_checkpoint(
    cfg: Config, storage: Storage, checkpoint: str | None = None, cache_dir: Path | None = None
) -> tuple[str, int | None]:
    """(local checkpoint prefix, step) for ``checkpoint`` or the latest one in ``model_dir``.

    ``checkpoint`` may be a prefix (``.../ckpt-4``), a folder holding a
    ``checkpoint`` index, a local path or an ``s3://`` URL.

    Raises:
        DataError: nothing to load.
    """
    from openimages_od.config import normalize_root

    if checkpoint:
        url = normalize_root(checkpoint)
        if storage.exists(join_url(url, "checkpoint")):
            found = latest_checkpoint_url(url, storage)
            if found is None:
                raise DataError(f"no checkpoint listed in {join_url(url, 'checkpoint')}")
            url = found
        return fetch_checkpoint(url, storage, cache_dir), checkpoint_step(url)
    found = latest_checkpoint_url(cfg.model_dir, storage)
    if found is None:
        raise DataError(f"no checkpoint in {cfg.model_dir} (run `oiod train` first, or pass --checkpoint)")
    return fetch_checkpoint(found, storage, cache_dir), checkpoint_step(found)
