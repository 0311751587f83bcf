"""The plan: the contract between ``oiod plan`` and ``oiod prepare``.

Layout under ``{output}/plan/``:

* ``manifest.json``: ``{"format": 1, "splits": {split: {"num_shards", "num_images",
  "num_boxes", "shards": [relative parquet paths]}}, "num_classes", "label_map",
  "config_digest"}``. Written last: a plan exists when its manifest does.
* ``{split}/shard-{i:05d}-of-{n:05d}.parquet``: one row per image of that
  shard, sorted by ``image_id``, with :data:`PLAN_SCHEMA`.
* ``stats.json``: per split ``images``, ``boxes``, per-class counts, and the
  malformed-row counts by reason.

Shard assignment is :func:`shard_of`: a stable hash of the ImageID modulo the
shard count, so it does not depend on worker count or row order.
``source_id`` is :func:`openimages_od.openimages.ids.source_id` of the
ImageID: numeric (an int64, as Model Garden parses it) and the same for an
image whatever the selection, split or release.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from openimages_od.config import join_url

__all__ = [
    "PLAN_SCHEMA",
    "BOX_TYPE",
    "IMAGE_LABEL_TYPE",
    "PlanManifest",
    "SplitManifest",
    "shard_of",
    "num_shards_for",
    "shard_name",
    "plan_shard_path",
    "write_plan_table",
    "read_plan_table",
    "read_manifest",
    "write_manifest",
]

BOX_TYPE = pa.struct(
    [
        ("label_id", pa.int32()),
        ("mid", pa.string()),
        ("xmin", pa.float32()),
        ("xmax", pa.float32()),
        ("ymin", pa.float32()),
        ("ymax", pa.float32()),
        ("confidence", pa.float32()),
        # Attributes: 1 yes, 0 no, -1 unknown.
        ("is_occluded", pa.int8()),
        ("is_truncated", pa.int8()),
        ("is_group_of", pa.int8()),
        ("is_depiction", pa.int8()),
        ("is_inside", pa.int8()),
    ]
)

# Human-verified image-level labels: confidence 1 = present, 0 = verified absent.
IMAGE_LABEL_TYPE = pa.struct([("label_id", pa.int32()), ("mid", pa.string()), ("confidence", pa.float32())])

PLAN_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("source_id", pa.int64()),
        ("bucket_key", pa.string()),
        ("original_url", pa.string()),
        ("thumbnail_url", pa.string()),
        ("original_md5", pa.string()),
        ("original_size", pa.int64()),
        ("rotation", pa.int32()),  # counter-clockwise degrees; null = unknown (treated as 0)
        ("boxes", pa.list_(BOX_TYPE)),
        ("image_labels", pa.list_(IMAGE_LABEL_TYPE)),
    ]
)


def shard_of(image_id: str, num_shards: int) -> int:
    """Stable shard number for an ImageID (independent of workers, order and Python's hash seed)."""
    h = int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big")
    return h % num_shards


def num_shards_for(num_images: int, images_per_shard: int) -> int:
    return max(1, math.ceil(num_images / images_per_shard))


def shard_name(split: str, index: int, num_shards: int) -> str:
    """``{split}-{i:05d}-of-{n:05d}``: the stem shared by TFRecord, stats and ledger files."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def plan_shard_path(split: str, index: int, num_shards: int) -> str:
    """Path of a plan shard relative to ``{output}/plan``."""
    return f"{split}/shard-{index:05d}-of-{num_shards:05d}.parquet"


@dataclass
class SplitManifest:
    num_shards: int
    num_images: int
    num_boxes: int
    shards: list[str] = field(default_factory=list)


@dataclass
class PlanManifest:
    splits: dict[str, SplitManifest]
    num_classes: int
    label_map: str = "label_map.pbtxt"
    config_digest: str = ""
    format: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "num_classes": self.num_classes,
            "label_map": self.label_map,
            "config_digest": self.config_digest,
            "splits": {k: vars(v) for k, v in self.splits.items()},
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PlanManifest":
        return cls(
            splits={k: SplitManifest(**v) for k, v in d["splits"].items()},
            num_classes=int(d["num_classes"]),
            label_map=d.get("label_map", "label_map.pbtxt"),
            config_digest=d.get("config_digest", ""),
            format=int(d.get("format", 1)),
            extra=d.get("extra", {}),
        )


def write_plan_table(storage: Any, url: str, table: pa.Table) -> None:
    """Write one plan shard (atomically) as Parquet with :data:`PLAN_SCHEMA`."""
    table = table.cast(PLAN_SCHEMA) if table.schema != PLAN_SCHEMA else table
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue())


def read_plan_table(storage: Any, url: str, columns: Optional[list[str]] = None) -> pa.Table:
    data = storage.read_bytes(url)
    return pq.read_table(io.BytesIO(data), columns=columns)


def read_manifest(storage: Any, plan_url: str) -> PlanManifest:
    return PlanManifest.from_json(storage.read_json(join_url(plan_url, "manifest.json")))


def write_manifest(storage: Any, plan_url: str, manifest: PlanManifest) -> None:
    storage.write_json(join_url(plan_url, "manifest.json"), manifest.to_json())
