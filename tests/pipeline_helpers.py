"""Helpers for the prepare-pipeline tests and benchmark: generated photos and hand-built plans.

:func:`write_plan` builds a complete plan (Parquet shards + manifest + label
map) from a list of image dicts, exactly as ``oiod plan`` lays it out, so the
pipeline can be tested without the planner.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from openimages_od.config import join_url
from openimages_od.openimages.ids import source_id
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.openimages.planio import (
    PLAN_SCHEMA,
    PlanManifest,
    SplitManifest,
    num_shards_for,
    plan_shard_path,
    shard_of,
    write_manifest,
    write_plan_table,
)

MIDS = ["/m/0k4j", "/m/01g317", "/m/0199g"]  # Car, Person, Bicycle (real Open Images MIDs)
NAMES = {"/m/0k4j": "Car", "/m/01g317": "Person", "/m/0199g": "Bicycle"}


def photo(
    width: int,
    height: int,
    seed: int = 0,
    quality: int = 90,
    fmt: str = "JPEG",
    exif_orientation: int | None = None,
    texture: float = 40.0,
) -> bytes:
    """A photo-like image: smooth gradients, a few shapes and noise (so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / (17 + seed % 7) + seed),
            128 + 100 * np.cos(yy / (23 + seed % 5)),
            128 + 80 * np.sin((xx + yy) / 31.0),
        ],
        axis=-1,
    )
    base += rng.normal(0, texture, size=base.shape)
    # A distinct bright block in the top-left quarter: makes orientation visible in tests.
    base[: height // 4, : width // 4] = (250, 20, 20)
    arr = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    kw: dict[str, Any] = {}
    if fmt == "JPEG":
        kw["quality"] = quality
        if exif_orientation:
            exif = Image.Exif()
            exif[0x0112] = exif_orientation
            kw["exif"] = exif.tobytes()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def box(label_id: int, xmin: float, xmax: float, ymin: float, ymax: float, group_of: int = 0) -> dict:
    return {
        "label_id": label_id,
        "mid": MIDS[label_id - 1],
        "xmin": xmin,
        "xmax": xmax,
        "ymin": ymin,
        "ymax": ymax,
        "confidence": 1.0,
        "is_occluded": 0,
        "is_truncated": 1,
        "is_group_of": group_of,
        "is_depiction": -1,
        "is_inside": 0,
    }


def image_row(
    image_id: str,
    split: str = "train",
    *,
    boxes: list[dict] | None = None,
    rotation: int | None = None,
    original_url: str | None = None,
    thumbnail_url: str | None = None,
    original_md5: str | None = None,
    image_labels: list[dict] | None = None,
) -> dict:
    """A plan row (without shard/source_id, which :func:`write_plan` assigns)."""
    return {
        "image_id": image_id,
        "split": split,
        "bucket_key": f"{split}/{image_id}.jpg",
        "original_url": original_url,
        "thumbnail_url": thumbnail_url,
        "original_md5": original_md5,
        "original_size": None,
        "rotation": rotation,
        "boxes": boxes if boxes is not None else [box(1, 0.1, 0.5, 0.2, 0.6)],
        "image_labels": image_labels or [],
    }


def write_plan(
    storage: Any,
    output_url: str,
    rows: Iterable[dict],
    images_per_shard: int = 4,
    num_shards: dict[str, int] | None = None,
) -> PlanManifest:
    """Write ``{output}/plan/`` and ``label_map.pbtxt`` for ``rows`` (planio contract)."""
    plan_url = join_url(output_url, "plan")
    by_split: dict[str, list[dict]] = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(dict(r))
    splits = {}
    for split, items in sorted(by_split.items()):
        items.sort(key=lambda r: r["image_id"])
        n = (num_shards or {}).get(split) or num_shards_for(len(items), images_per_shard)
        for r in items:
            r["source_id"] = source_id(r["image_id"])
            r["shard"] = shard_of(r["image_id"], n)
        rels, shas = [], []
        for i in range(n):
            part = [r for r in items if r["shard"] == i]
            rel = plan_shard_path(split, i, n)
            shas.append(
                write_plan_table(
                    storage, join_url(plan_url, rel), pa.Table.from_pylist(part, schema=PLAN_SCHEMA)
                )
            )
            rels.append(rel)
        splits[split] = SplitManifest(
            num_shards=n,
            num_images=len(items),
            num_boxes=sum(len(r["boxes"]) for r in items),
            shards=rels,
            shard_sha256=shas,
        )
    lm = LabelMap.from_mids(MIDS, NAMES)
    storage.write_text(join_url(output_url, "label_map.pbtxt"), lm.to_pbtxt())
    storage.write_text(join_url(output_url, "label_map.csv"), lm.to_csv())
    manifest = PlanManifest(splits=splits, num_classes=len(lm), label_map_digest=lm.digest)
    write_manifest(storage, plan_url, manifest)
    return manifest


def plan_rows_by_id(rows: Iterable[dict]) -> dict[str, dict]:
    return {r["image_id"]: r for r in rows}
