"""The output layout and its commit rules: the one module that knows every path under ``output.url``.

Every stage asks :class:`Layout` where things are instead of joining strings,
and asks the rules below whether something is committed::

    label_map.pbtxt, label_map.csv          classes and their ids (stable across re-plans)
    metadata/                               cached copies of remote metadata files
    plan/manifest.json                      written last: the plan exists when this does
    plan/stats.json, plan/{split}/shard-*.parquet
    tfrecords/{split}/{name}.{ext}          the shard file: .tfrecord (one tf.Example per image) or the
                                            extension of the ``shards.format`` writer (.tar for webdataset)
    tfrecords/{split}/{name}.stats.json     written last: names the shard key and the file's sha256
    ledger/{split}/{name}.jsonl             per image: status, source, cache hit or not
    cache/images-{image_digest}/...         the image cache (or ``output.cache_url``)
    prepare_report.json
    dataset.json                            the dataset lockfile, written by prepare when all is committed
    .oiod.lock                              held by plan and prepare (see :mod:`openimages_od.outputlock`)
    model/ (train.model_dir), eval/metrics-{step}.json, export/ (export.dir), report.html

Rules:

* A plan shard's identity is the sha256 of its Parquet bytes (image ids,
  boxes, labels, rotation, URLs, source ids, shard assignment). A TFRecord
  shard's **key** is that digest combined with the label map's digest and the
  digest of the image settings that change bytes (:func:`shard_key`).
* A shard is **committed for the current plan** when its ``.stats.json``
  exists and records that key (:func:`is_current`). A shard whose stats record
  another key is *stale*: prepare rebuilds it; nothing else ever reads it.
* Readers (train, evaluate) read only the shards that ``dataset.json`` lists,
  and only while ``dataset.json`` matches the current plan and label map.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openimages_od.config import Config, ImageConfig

__all__ = [
    "DEFAULT_FORMAT",
    "SHARD_KEY_FIELD",
    "Layout",
    "ShardSpec",
    "combine",
    "image_digest",
    "image_settings",
    "is_current",
    "shard_file_bytes",
    "shard_file_sha256",
    "shard_key",
    "text_digest",
]

SHARD_KEY_FIELD = "shard_key"
DEFAULT_FORMAT = "tfrecord"  # shards.format's default; what train and evaluate read

# Image settings that change the bytes of a record (or whether an image is accepted).
_BYTE_SETTINGS = (
    "max_side",
    "quality",
    "keep_original_if_fits",
    "max_pixels",
    "min_side",
    "verify_md5",
    "reject_placeholder",
    "exif",
    "resample",
)


def _join(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def text_digest(text: str | bytes) -> str:
    """sha256 hex of a text (or bytes)."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def combine(*parts: Any) -> str:
    """sha256 hex of a JSON list of ``parts`` (a digest of digests, order-sensitive)."""
    return text_digest(json.dumps(list(parts), sort_keys=True, separators=(",", ":")))


def image_settings(ic: ImageConfig) -> dict[str, Any]:
    """The ``image`` settings that change what a shard holds."""
    d = ic.model_dump(mode="json")
    return {k: d[k] for k in _BYTE_SETTINGS if k in d}


def image_digest(ic: ImageConfig) -> str:
    """Digest of :func:`image_settings` (16 hex digits: it names a cache folder)."""
    return combine(image_settings(ic))[:16]


def shard_key(
    plan_shard_sha256: str, label_map_digest: str, image_settings_digest: str, shard_format: str = "tfrecord"
) -> str:
    """What a shard must have been made from (and written as) to belong to the current plan."""
    if shard_format == DEFAULT_FORMAT:
        return combine("shard", plan_shard_sha256, label_map_digest, image_settings_digest)
    return combine("shard", plan_shard_sha256, label_map_digest, image_settings_digest, shard_format)


def shard_file_sha256(stats: dict[str, Any]) -> str:
    """The sha256 of the shard file a stats document describes ("" if none)."""
    # Stats written before shards.format existed name only the TFRecord's digest.
    return str(stats.get("file_sha256") or stats.get("tfrecord_sha256") or "")


def shard_file_bytes(stats: dict[str, Any]) -> int:
    """The size of the shard file a stats document describes."""
    return int(stats.get("file_bytes", stats.get("tfrecord_bytes", 0)))


def is_current(stats: dict[str, Any] | None, key: str) -> bool:
    """The commit rule: a stats document that exists and names ``key``."""
    if not stats:
        return False
    return stats.get(SHARD_KEY_FIELD) == key and bool(shard_file_sha256(stats))


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the current plan: where its inputs and outputs are and what it must match."""

    split: str
    index: int
    num_shards: int
    name: str
    plan_url: str
    plan_sha256: str
    key: str
    file: str  # the shard file (its extension is the format's)
    stats: str
    ledger: str


class Layout:
    """Every location under ``output.url`` (plus ``train.model_dir``, ``export.dir`` and the image cache).

    Args:
        root: the output root URL (normalized, no trailing slash).
        model_dir: ``train.model_dir`` (default ``{root}/model``).
        export_dir: ``export.dir`` (default ``{root}/export``).
        cache_root: the image cache root (default ``{root}/cache``).
        shard_format: ``shards.format`` (part of every shard key; see :func:`shard_key`).
        shard_extension: the shard files' extension, without the dot (the format's writer names it).
    """

    def __init__(
        self,
        root: str,
        *,
        model_dir: str | None = None,
        export_dir: str | None = None,
        cache_root: str | None = None,
        shard_format: str = DEFAULT_FORMAT,
        shard_extension: str = "tfrecord",
    ) -> None:
        self.root = root.rstrip("/")
        self.shard_format = shard_format
        self.shard_extension = shard_extension
        self.model_dir = (model_dir or self.path("model")).rstrip("/")
        self.export_dir = (export_dir or self.path("export")).rstrip("/")
        self.cache_root = (cache_root or self.path("cache")).rstrip("/")

    @classmethod
    def from_config(cls, cfg: Config) -> Layout:
        from openimages_od.config import normalize_root
        from openimages_od.pipeline.writers import resolve_writer

        cache = getattr(cfg.output, "cache_url", None)
        return cls(
            cfg.output_root,
            model_dir=cfg.model_dir,
            export_dir=cfg.export_dir,
            cache_root=normalize_root(cache) if cache else None,
            shard_format=cfg.shards.format,
            shard_extension=resolve_writer(cfg.shards.format).extension,
        )

    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def relative(self, url: str) -> str:
        """``url`` relative to the root (as recorded in ``dataset.json``), or ``url`` itself if outside it."""
        prefix = self.root + "/"
        return url[len(prefix) :] if url.startswith(prefix) else url

    # -- plan
    @property
    def label_map_pbtxt(self) -> str:
        return self.path("label_map.pbtxt")

    @property
    def label_map_csv(self) -> str:
        return self.path("label_map.csv")

    @property
    def metadata_dir(self) -> str:
        return self.path("metadata")

    @property
    def plan_dir(self) -> str:
        return self.path("plan")

    @property
    def plan_manifest(self) -> str:
        return self.path("plan", "manifest.json")

    @property
    def plan_stats(self) -> str:
        return self.path("plan", "stats.json")

    def plan_shard(self, rel: str) -> str:
        """A plan shard from its manifest-relative path."""
        return self.path("plan", rel)

    # -- shards
    def tfrecords_dir(self, split: str | None = None) -> str:
        """The shard directory (named for the default format; it holds the shards of any format)."""
        return self.path("tfrecords", split) if split else self.path("tfrecords")

    def ledger_dir(self, split: str | None = None) -> str:
        return self.path("ledger", split) if split else self.path("ledger")

    def shard_file(self, split: str, name: str) -> str:
        """The shard file of ``name`` in the configured format."""
        return self.path("tfrecords", split, f"{name}.{self.shard_extension}")

    def shard_stats(self, split: str, name: str) -> str:
        return self.path("tfrecords", split, f"{name}.stats.json")

    def ledger(self, split: str, name: str) -> str:
        return self.path("ledger", split, f"{name}.jsonl")

    def shard_urls(self, split: str, name: str) -> dict[str, str]:
        return {
            "file": self.shard_file(split, name),
            "stats": self.shard_stats(split, name),
            "ledger": self.ledger(split, name),
        }

    @property
    def prepare_report(self) -> str:
        return self.path("prepare_report.json")

    @property
    def dataset(self) -> str:
        """The dataset lockfile."""
        return self.path("dataset.json")

    @property
    def lock(self) -> str:
        return self.path(".oiod.lock")

    # -- image cache
    def image_cache_dir(self, settings_digest: str) -> str:
        return _join(self.cache_root, f"images-{settings_digest}")

    def image_cache(self, settings_digest: str, image_id: str) -> str:
        # A 2-character fan-out keeps local folders and S3 listings manageable at 1.7M images.
        return _join(self.image_cache_dir(settings_digest), image_id[:2] or "_", f"{image_id}.oiodimg")

    # -- training and after
    @property
    def model_dataset(self) -> str:
        """The copy of ``dataset.json`` a model directory keeps: what the model was trained on."""
        return _join(self.model_dir, "dataset.json")

    @property
    def eval_dir(self) -> str:
        return self.path("eval")

    def metrics(self, step: int) -> str:
        return self.path("eval", f"metrics-{step}.json")

    @property
    def report_html(self) -> str:
        return self.path("report.html")

    # -- the current plan's shards
    def shard_specs(
        self, manifest: Any, image_settings_digest: str, splits: set[str] | None = None
    ) -> list[ShardSpec]:
        """Every shard the plan ``manifest`` calls for (optionally only ``splits``), in order."""
        from openimages_od.openimages.planio import shard_name

        out: list[ShardSpec] = []
        for split in sorted(manifest.splits):
            if splits and split not in splits:
                continue
            sm = manifest.splits[split]
            for i, rel in enumerate(sm.shards):
                name = shard_name(split, i, sm.num_shards)
                sha = sm.shard_sha256[i] if i < len(sm.shard_sha256) else ""
                urls = self.shard_urls(split, name)
                out.append(
                    ShardSpec(
                        split,
                        i,
                        sm.num_shards,
                        name,
                        self.plan_shard(rel),
                        sha,
                        shard_key(sha, manifest.label_map_digest, image_settings_digest, self.shard_format),
                        urls["file"],
                        urls["stats"],
                        urls["ledger"],
                    )
                )
        return out

    def shard_files(self, storage: Any, split: str) -> dict[str, int]:
        """Shard, stats and ledger files present for ``split`` (URL -> size)."""
        out: dict[str, int] = {}
        for prefix in (self.tfrecords_dir(split) + "/", self.ledger_dir(split) + "/"):
            try:
                out.update({o.url: o.size for o in storage.list(prefix)})
            except FileNotFoundError:
                pass
        return out
