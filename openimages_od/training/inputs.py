"""Find committed shards, stage them to local disk, read the label map.

TensorFlow has no ``s3://`` filesystem here (tensorflow-io is broken on
TF >= 2.20), so shards on S3 are copied to a local cache once, in parallel,
and TF reads local files. The shards read are exactly those the output's
``dataset.json`` lists, and only while it is the dataset of the current plan
and label map (:func:`openimages_od.dataset.dataset_shards`).

This module does not import TensorFlow.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from openimages_od.config import Config
from openimages_od.errors import DataError
from openimages_od.layout import Layout
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage, local_path

__all__ = ["committed_shards", "default_cache_dir", "load_hierarchy", "load_label_map", "stage_shards"]

log = logging.getLogger(__name__)


def committed_shards(cfg: Config, split: str, storage: Storage) -> list[str]:
    """URLs of the shards of ``split`` that the output's ``dataset.json`` lists (in its order).

    Raises:
        DataError: no dataset.json, or it does not match the current plan or label map,
            or the split was not prepared (see :func:`openimages_od.dataset.dataset_shards`).
    """
    from openimages_od.dataset import dataset_shards

    return dataset_shards(cfg, storage, split)[0]


def default_cache_dir(cfg: Config) -> Path:
    """``train.cache_dir`` or a per-user temp folder (kept between runs so staging is done once)."""
    if cfg.train.cache_dir:
        return Path(os.path.expanduser(cfg.train.cache_dir)).absolute()
    return Path(tempfile.gettempdir()) / f"oiod-cache-{os.getuid()}"


def stage_shards(urls: list[str], storage: Storage, cache_dir: Path, *, threads: int = 8) -> list[str]:
    """Local paths for ``urls``: local files as they are, remote ones copied into ``cache_dir``.

    A cached copy with the same size as the object is reused; downloads run in a
    thread pool and are atomic (a partial file never has the final name).
    """

    def one(url: str) -> str:
        lp = local_path(url)
        if lp is not None:
            return str(lp)
        p = urlparse(url)
        dest = cache_dir / p.scheme / p.netloc / p.path.lstrip("/")
        size = storage.size(url)
        if dest.is_file() and dest.stat().st_size == size:
            return str(dest)
        storage.download_file(url, dest)
        return str(dest)

    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        out = list(pool.map(one, urls))
    log.info("staged %d shards (%s)", len(out), cache_dir)
    return out


def load_label_map(cfg: Config, storage: Storage) -> LabelMap:
    """The prepare output's ``label_map.pbtxt``.

    Raises:
        DataError: it is missing (plan has not run) or malformed.
    """
    url = Layout.from_config(cfg).label_map_pbtxt
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise DataError(f"label map not found: {url} (run `oiod plan` / `oiod prepare` first)") from None
    return LabelMap.from_pbtxt(text, url)


def load_hierarchy(cfg: Config, storage: Storage) -> dict | None:
    """The Open Images box hierarchy JSON, or None when none is available.

    Looks at ``source.hierarchy`` first, then at a cached copy under
    ``{output}/metadata/`` (the plan caches remote metadata there).
    """
    import json

    candidates: list[str] = []
    meta_prefix = cfg.output_path("metadata") + "/"
    try:
        candidates += [
            o.url
            for o in storage.list(meta_prefix)
            if "hierarchy" in o.url.rsplit("/", 1)[-1].lower() and o.url.endswith(".json")
        ]
    except (FileNotFoundError, OSError):
        pass
    if cfg.source.hierarchy:
        candidates.insert(0, cfg.source.hierarchy)
    for url in candidates:
        try:
            return json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("cannot read hierarchy %s (%s); trying the next source", url, exc)
    return None
