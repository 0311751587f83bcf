"""A :class:`~openimages_od.storage.Storage` for a whole config.

The storage layer takes only its own option objects; this module is the one
place that knows which config sections name which buckets, so storage never
imports the config (and the two stay free of an import cycle).
"""

from __future__ import annotations

from openimages_od.config import Config
from openimages_od.storage import GcsOptions, S3Options, Storage, split_s3_url

__all__ = ["storage_from_config"]


def storage_from_config(cfg: Config) -> Storage:
    """Options for every bucket the config names; the output bucket's options win.

    Args:
        cfg: the whole configuration.

    Returns:
        A storage layer with per-bucket S3 options (metadata, image bucket, outputs) and per-bucket
        GCS options (the ``gcs`` image source's bucket).
    """
    buckets: dict[str, S3Options] = {}
    for url in _metadata_urls(cfg):
        if url.startswith("s3://"):
            buckets[split_s3_url(url)[0]] = cfg.source.s3
    images = cfg.source.images
    buckets[images.bucket] = images.s3
    outputs: tuple[str | None, ...] = (
        cfg.output.url,
        cfg.output.cache_url,
        cfg.train.model_dir,
        cfg.export.dir,
        cfg.serve.model,
    )
    for out in outputs:
        if out and out.startswith("s3://"):
            buckets[split_s3_url(out)[0]] = cfg.output.s3
    gcs_buckets: dict[str, GcsOptions] = {}
    if images.gcs.bucket:
        gcs_buckets[images.gcs.bucket] = images.gcs.storage_options()
    return Storage(s3=cfg.output.s3, bucket_options=buckets, gcs_bucket_options=gcs_buckets)


def _metadata_urls(cfg: Config) -> list[str]:
    s = cfg.source
    urls = [u for u in (s.class_descriptions, s.hierarchy, s.trainable_classes) if u]
    for sp in s.splits.values():
        urls.extend(u for u in (sp.boxes, sp.images, sp.image_labels) if u)
    return urls
