"""``{output}/prepare_report.json``: totals and per-shard figures from the shards' stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["build_report"]


def build_report(
    shard_stats: Iterable[dict[str, Any]],
    *,
    wall_s: float,
    skipped: Iterable[str] = (),
    failed_shards: dict[str, str] | None = None,
    ray_info: dict[str, Any] | None = None,
    retries: int = 0,
) -> dict[str, Any]:
    """Aggregate shard stats.

    Args:
        shard_stats: every committed shard's stats (this run's and earlier ones').
        wall_s: wall-clock time of this run.
        skipped: shard names already committed before this run (no work done).
        failed_shards: shard name -> error for shards that could not be committed.
        ray_info: actors, CPUs and address used.
        retries: shard re-submissions in this run (killed actors, storage errors).
    """
    stats = sorted(shard_stats, key=lambda s: (s["split"], s["shard"]))
    skipped = set(skipped)
    by_reason: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    splits: dict[str, Counter[str]] = {}
    for s in stats:
        by_reason.update(s.get("failed_by_reason", {}))
        sources.update(s.get("sources", {}))
        sp = splits.setdefault(s["split"], Counter())
        sp.update(
            {
                "shards": 1,
                "images": s["images"],
                "ok": s["ok"],
                "failed": s["failed"],
                "boxes": s.get("boxes", 0),
            }
        )
    done_now = [s for s in stats if s["name"] not in skipped]
    images_now = sum(s["images"] for s in done_now)
    # Shards made before the image cache existed have no cache figures: every image was a fetch.
    fetches_now = sum(s.get("source_fetches", s["images"] - s.get("reused", 0)) for s in done_now)
    return {
        "format": 1,
        "totals": {
            "shards": len(stats),
            "images": sum(s["images"] for s in stats),
            "ok": sum(s["ok"] for s in stats),
            "failed": sum(s["failed"] for s in stats),
            "failed_by_reason": dict(sorted(by_reason.items())),
            "sources": dict(sorted(sources.items())),
            "boxes": sum(s.get("boxes", 0) for s in stats),
            "bytes_fetched": sum(s.get("bytes_fetched", 0) for s in stats),
            "tfrecord_bytes": sum(s.get("tfrecord_bytes", 0) for s in stats),
            "file_bytes": sum(s.get("file_bytes", s.get("tfrecord_bytes", 0)) for s in stats),
            "kept_original": sum(s.get("kept_original", 0) for s in stats),
            "cache_hits": sum(s.get("cache_hits", 0) for s in stats),
        },
        "this_run": {
            "shards_processed": len(done_now),
            "shards_skipped": len(skipped),
            "shards_failed": len(failed_shards or {}),
            "images_processed": images_now,
            "source_fetches": fetches_now,
            "cache_hits": sum(s.get("cache_hits", 0) for s in done_now),
            "wall_s": round(wall_s, 3),
            "images_per_s": round(images_now / wall_s, 2) if wall_s > 0 else None,
            "shard_retries": retries,
        },
        "splits": {k: dict(v) for k, v in sorted(splits.items())},
        "failed_shards": dict(sorted((failed_shards or {}).items())),
        "ray": ray_info or {},
        "shards": [
            {
                k: s.get(k)
                for k in (
                    "split",
                    "shard",
                    "name",
                    "images",
                    "ok",
                    "failed",
                    "failed_by_reason",
                    "sources",
                    "boxes",
                    "bytes_fetched",
                    "tfrecord_bytes",
                    "duration_s",
                    "images_per_s",
                    "reused",
                    "kept_original",
                    "cache_hits",
                    "source_fetches",
                    "worker",
                    "shard_key",
                    "tfrecord_sha256",
                    "shard_format",
                    "file_bytes",
                    "file_sha256",
                )
            }
            for s in stats
        ],
    }
