"""``oiod export-dataset``: committed shards -> COCO / YOLO / Pascal VOC, with a manifest written last.

Commit protocol of an export folder:

1. If ``export.json`` exists and names the same format, dataset digest and
   splits, the export is up to date and nothing is written.
2. Otherwise ``export.json`` is deleted first (so a half-written export is
   never taken for a finished one), then every file under the folders the
   format owns (nothing else under ``--out``), so no image of an earlier export
   survives into this one.
3. Each split streams shard by shard (one shard in memory); every object is
   written atomically by the storage layer; images are named ``{image_id}.jpg``
   and written once.
4. ``export.json`` is written last: format, dataset digest, label map digest,
   per-split image/box counts and index files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from openimages_od.config import Config, normalize_root
from openimages_od.convert import FORMATS, writer_class
from openimages_od.convert.base import ExportTarget
from openimages_od.convert.reader import iter_shard
from openimages_od.dataset import dataset_shards, read_dataset
from openimages_od.errors import DataError, UsageError
from openimages_od.layout import Layout
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import ObjectNotFound, Storage, StorageError
from openimages_od.storage_setup import storage_from_config

__all__ = ["EXPORT_MANIFEST", "export_dataset", "run_export_dataset"]

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "export.json"
EXPORT_FORMAT_VERSION = 1


def _check_shard_format(cfg: Config) -> None:
    fmt = getattr(cfg.shards, "format", "tfrecord")
    if fmt != "tfrecord":
        raise DataError(
            f"shards.format is {fmt!r}: export-dataset reads TFRecord shards only "
            f"(prepare the output with shards.format=tfrecord to export it)"
        )


def _choose_splits(doc: dict[str, Any], splits: Sequence[str] | None, where: str) -> list[str]:
    prepared = sorted(doc["splits"])
    if not prepared:
        raise DataError(f"no committed shards: {where} lists no prepared split (run `oiod prepare`)")
    chosen = list(dict.fromkeys(splits)) if splits else prepared
    unknown = [s for s in chosen if s not in doc["splits"]]
    if unknown:
        raise UsageError(
            f"unknown split{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"{where} has {', '.join(prepared)}"
        )
    return chosen


def _export_root(layout: Layout, fmt: str, out: str | None) -> str:
    root = normalize_root(out) if out else layout.path("exports", fmt)
    if root == layout.root or layout.root.startswith(root + "/"):
        raise UsageError(
            f"--out {out!r} is the output folder {layout.root} or contains it; an export replaces the "
            f"folders its format owns, so give it a folder of its own (default {layout.path('exports', fmt)})"
        )
    return root


def _read_manifest(storage: Storage, url: str) -> dict[str, Any] | None:
    try:
        doc = storage.read_json(url)
    except ObjectNotFound:
        return None
    except StorageError:
        return {}  # unreadable: treated as not up to date, and replaced
    return doc if isinstance(doc, dict) else {}


def export_dataset(
    cfg: Config,
    fmt: str,
    splits: Sequence[str] | None = None,
    out: str | None = None,
    *,
    storage: Storage | None = None,
    threads: int = 8,
) -> dict[str, Any]:
    """Export the committed shards of ``splits`` (default: every prepared split) as ``fmt``.

    Args:
        cfg: the config of the prepared output.
        fmt: a name in :data:`openimages_od.convert.FORMATS` (``coco``, ``yolo``, ``voc``).
        splits: splits to export; each must be in ``dataset.json``.
        out: export folder URL (local path, ``file://`` or ``s3://``; default
            ``{output.url}/exports/{fmt}``).
        storage: the storage layer (default from ``cfg``).
        threads: parallel object writes.

    Returns:
        The export manifest (``export.json``), with ``up_to_date`` true when nothing was written.

    Raises:
        UsageError: unknown format or split, or ``out`` would overlap the output folder.
        DataError: no committed shards (no ``dataset.json``), the dataset is not the current plan's,
            the shards are not TFRecord, or a shard is corrupt.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    _check_shard_format(cfg)
    storage = storage or storage_from_config(cfg)
    layout = Layout.from_config(cfg)
    doc = read_dataset(layout, storage)
    chosen = _choose_splits(doc, splits, layout.dataset)
    shard_urls = {split: dataset_shards(cfg, storage, split)[0] for split in chosen}
    label_map = LabelMap.from_pbtxt(storage.read_text(layout.label_map_pbtxt), layout.label_map_pbtxt)
    root = _export_root(layout, fmt, out)
    manifest_url = f"{root}/{EXPORT_MANIFEST}"
    identity = {
        "format": fmt,
        "format_version": EXPORT_FORMAT_VERSION,
        "dataset_digest": doc["digest"],
        "splits": chosen,
    }
    old = _read_manifest(storage, manifest_url)
    if old and {k: old.get(k) for k in identity} == identity:
        log.info("export %s is up to date (dataset %s)", root, str(doc["digest"])[:12])
        return {**old, "up_to_date": True}

    cls = writer_class(fmt)
    target = ExportTarget(root, storage, threads)
    try:
        if old is not None:
            storage.delete(manifest_url)  # first: from here on the folder is not a finished export
        owned = cls.owned
        if old and old.get("format") in FORMATS and old.get("format") != fmt:
            owned += writer_class(old["format"]).owned  # another format's export in this folder is replaced
        removed = target.clear(tuple(dict.fromkeys(owned)))
        if removed:
            log.info("removed %d files of the previous export under %s", removed, root)
        writer = cls(target, list(label_map.classes))
        split_info: dict[str, Any] = {}
        for split in chosen:
            images = boxes = 0
            writer.begin_split(split)
            for url in shard_urls[split]:
                for sample in iter_shard(storage, url):
                    writer.add(sample)
                    images += 1
                    boxes += len(sample.boxes)
                target.wait()  # a failed write names its URL here, next to the shard that caused it
            files = writer.end_split(split)
            target.wait()
            split_info[split] = {
                "images": images,
                "boxes": boxes,
                "shards": len(shard_urls[split]),
                "files": files,
            }
            log.info(
                "exported %s: %d images, %d boxes from %d shards",
                split,
                images,
                boxes,
                len(shard_urls[split]),
            )
        dataset_files = writer.finish(chosen)
        target.wait()
        manifest = {
            **identity,
            "label_map_digest": doc.get("label_map_digest"),
            "plan_digest": doc.get("plan_digest"),
            "categories": [{"id": c.id, "mid": c.mid, "name": c.name} for c in label_map.classes],
            "split_info": split_info,
            "files": dataset_files,
            **writer.describe(),
        }
        storage.write_json(manifest_url, manifest)
    finally:
        target.close()
    return {**manifest, "up_to_date": False}


def run_export_dataset(
    cfg: Config, export_format: str, split: Sequence[str] | None = None, out: str | None = None
) -> int:
    """``oiod export-dataset``: :func:`export_dataset` and a one-line summary per split."""
    m = export_dataset(cfg, export_format, split, out)
    layout = Layout.from_config(cfg)
    root = _export_root(layout, export_format, out)
    state = "up to date" if m["up_to_date"] else "written"
    print(f"export   {export_format} at {root} ({state}; dataset {str(m['dataset_digest'])[:12]})")
    for name, info in m.get("split_info", {}).items():
        print(f"  {name}: {info['images']} images, {info['boxes']} boxes, {info['shards']} shards")
    return 0
