"""One shard end to end: plan rows -> fetch -> verify -> orient/resize -> tf.Example -> commit.

Pure of Ray: :func:`run_shard` is a coroutine that the Ray actor (or a test,
or a benchmark) runs inside its event loop. Commit protocol, per shard:

1. the TFRecord object (atomic write),
2. the ledger (one line per plan row, plan order),
3. ``{split}-{i:05d}-of-{n:05d}.stats.json`` last: the shard is committed.

Records are written in plan order (ImageID), and each record depends only on
the plan row and the source bytes, so the shard bytes are identical whatever
the worker count, timing or retries. ``retry_failed`` re-fetches only the
images the ledger records as failed and reuses the other records byte for byte
from the existing shard.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from openimages_od.config import Config
from openimages_od.errors import DataError
from openimages_od.openimages.planio import read_plan_table, shard_name
from openimages_od.pipeline.example import decode_example, detection_features, encode_example
from openimages_od.pipeline.fetch import FetchFailed, Fetched, Fetcher
from openimages_od.pipeline.geometry import render, transform_boxes
from openimages_od.pipeline.ledger import LedgerEntry, decode_ledger, encode_ledger
from openimages_od.pipeline.tfrecord import encode_records, iter_records
from openimages_od.pipeline.verify import Rejected, check_md5, open_image
from openimages_od.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

__all__ = ["ShardTask", "ShardContext", "run_shard", "process_image", "shard_urls", "CRASH_ENV"]

# Test hook: "IMAGE_ID:MARKER_PATH" makes the worker process exit (os._exit)
# the first time it reaches IMAGE_ID (the marker file makes it happen once),
# to test that a killed actor's shard is retried without loss or duplicates.
CRASH_ENV = "OIOD_TEST_CRASH_ONCE"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work and retry."""

    split: str
    index: int
    num_shards: int
    plan_url: str  # the plan shard (Parquet)
    retry_failed: bool = False

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.num_shards)


def shard_urls(cfg: Config, split: str, index: int, num_shards: int) -> dict[str, str]:
    """URLs of a shard's TFRecord, stats and ledger."""
    name = shard_name(split, index, num_shards)
    return {
        "tfrecord": cfg.output_path("tfrecords", split, f"{name}.tfrecord"),
        "stats": cfg.output_path("tfrecords", split, f"{name}.stats.json"),
        "ledger": cfg.output_path("ledger", split, f"{name}.jsonl"),
    }


@dataclass
class ShardContext:
    """What a worker shares between its shards."""

    cfg: Config
    storage: Storage
    fetcher: Fetcher
    cpu_pool: Executor
    semaphore: asyncio.Semaphore
    on_image: Optional[Callable[[bool, int], None]] = None  # (ok, bytes) per finished image
    crash_once: Optional[str] = None
    worker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageResult:
    entry: LedgerEntry
    record: Optional[bytes] = None
    fetched_bytes: int = 0
    boxes: int = 0


def process_image(fetched: Fetched, row: dict[str, Any], cfg: Config) -> tuple[bytes, LedgerEntry]:
    """Verify, orient, resize and encode one fetched image (CPU; runs in a thread).

    Returns:
        (serialized tf.Example, ledger entry).

    Raises:
        Rejected: the bytes are not usable (reason in ``.reason``).
    """
    ic = cfg.image
    if fetched.source == "original" and ic.verify_md5:
        check_md5(fetched.data, row.get("original_md5"))
    img = open_image(fetched.data, max_pixels=ic.max_pixels, min_side=ic.min_side,
                     reject_placeholder=ic.reject_placeholder)
    out = render(img, fetched.data, rotation=row.get("rotation"), max_side=ic.max_side, quality=ic.quality,
                 exif_mode=ic.exif, keep_original_if_fits=ic.keep_original_if_fits,
                 resample=ic.resample)
    src_boxes = [(b["xmin"], b["xmax"], b["ymin"], b["ymax"]) for b in (row.get("boxes") or [])]
    boxes = transform_boxes(src_boxes, out.ops)
    digest = hashlib.sha256(out.data).hexdigest()
    record = encode_example(detection_features(row, out.data, out.width, out.height, boxes, digest))
    entry = LedgerEntry(image_id=row["image_id"], status="ok", source=fetched.source, url=fetched.url,
                        bytes=len(fetched.data), width=out.width, height=out.height,
                        kept_original=out.kept_original)
    return record, entry


def _maybe_crash(ctx: ShardContext, image_id: str) -> None:
    if not ctx.crash_once:
        return
    target, _, marker = ctx.crash_once.partition(":")
    if target == image_id and marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os._exit(17)  # simulate a killed worker: no cleanup, no exception


async def _one(row: dict[str, Any], ctx: ShardContext) -> ImageResult:
    cfg = ctx.cfg
    loop = asyncio.get_running_loop()
    attempts: list[str] = []
    fetched_bytes = 0
    async with ctx.semaphore:
        _maybe_crash(ctx, row["image_id"])
        for source in cfg.source.images.order:
            try:
                fetched = await ctx.fetcher.fetch(source, row)
            except FetchFailed as exc:
                attempts.append(f"{source}:{exc.reason}")
                continue
            fetched_bytes += len(fetched.data)
            try:
                record, entry = await loop.run_in_executor(ctx.cpu_pool, process_image, fetched, row, cfg)
            except Rejected as exc:
                attempts.append(f"{source}:{exc.reason}")
                continue
            entry.attempts = attempts
            return ImageResult(entry, record, fetched_bytes, len(row.get("boxes") or []))
    # The last source's reason, unless it merely had no URL (then the one before it).
    reasons = [a.split(":", 1)[1] for a in attempts]
    informative = [r for r in reasons if r != "no_url"]
    error = informative[-1] if informative else (reasons[-1] if reasons else "no_source")
    return ImageResult(LedgerEntry(image_id=row["image_id"], status="failed", error=error, attempts=attempts),
                       None, fetched_bytes, 0)


async def _read_previous(task: ShardTask, ctx: ShardContext, urls: dict[str, str]) -> tuple[dict[str, bytes], dict[str, LedgerEntry]]:
    """Records and ledger entries of the existing shard (for ``retry_failed``)."""
    loop = asyncio.get_running_loop()
    st = ctx.storage
    try:
        ledger_raw = await loop.run_in_executor(None, st.read_bytes, urls["ledger"])
        data = await loop.run_in_executor(None, st.read_bytes, urls["tfrecord"])
    except ObjectNotFound:
        return {}, {}
    ledger = {e.image_id: e for e in decode_ledger(ledger_raw)}
    records: dict[str, bytes] = {}
    for rec in iter_records(data, urls["tfrecord"]):
        fn = decode_example(rec, keys=("image/filename",)).get("image/filename")
        if fn:
            records[bytes(fn[0]).decode()] = rec
    return records, ledger


async def run_shard(task: ShardTask, ctx: ShardContext) -> dict[str, Any]:
    """Produce and commit one shard; returns its stats (also written as ``.stats.json``).

    Per-image failures are recorded in the ledger; storage errors (reading the
    plan, writing outputs) raise, and the caller retries the whole shard.
    """
    t0 = time.monotonic()
    cfg, st = ctx.cfg, ctx.storage
    loop = asyncio.get_running_loop()
    urls = shard_urls(cfg, task.split, task.index, task.num_shards)
    table = await loop.run_in_executor(None, read_plan_table, st, task.plan_url)
    rows = table.to_pylist()
    rows.sort(key=lambda r: r["image_id"])
    for r in rows:
        if r["split"] != task.split:
            raise DataError(f"{task.plan_url}: row {r['image_id']} has split {r['split']!r}, expected {task.split!r}")

    reuse: dict[str, bytes] = {}
    old: dict[str, LedgerEntry] = {}
    if task.retry_failed:
        reuse, old = await _read_previous(task, ctx, urls)

    async def one(row: dict[str, Any]) -> ImageResult:
        prev = old.get(row["image_id"])
        if prev is not None and prev.ok and row["image_id"] in reuse:
            e = LedgerEntry(**{**prev.__dict__, "reused": True})
            res = ImageResult(e, reuse[row["image_id"]], 0, len(row.get("boxes") or []))
        else:
            res = await _one(row, ctx)
        if ctx.on_image is not None:
            ctx.on_image(res.entry.ok, res.fetched_bytes)
        return res

    results = await asyncio.gather(*(one(r) for r in rows))
    records = [r.record for r in results if r.record is not None]
    payload = encode_records(records)

    await loop.run_in_executor(None, st.write_bytes, urls["tfrecord"], payload)
    await loop.run_in_executor(None, st.write_bytes, urls["ledger"], encode_ledger(r.entry for r in results))

    duration = time.monotonic() - t0
    ok = sum(1 for r in results if r.entry.ok)
    stats = {
        "format": 1,
        "split": task.split,
        "shard": task.index,
        "num_shards": task.num_shards,
        "name": task.name,
        "tfrecord": urls["tfrecord"],
        "ledger": urls["ledger"],
        "images": len(results),
        "ok": ok,
        "failed": len(results) - ok,
        "failed_by_reason": dict(sorted(Counter(r.entry.error for r in results if not r.entry.ok).items())),
        "sources": dict(sorted(Counter(r.entry.source for r in results if r.entry.ok).items())),
        "kept_original": sum(1 for r in results if r.entry.kept_original),
        "reused": sum(1 for r in results if r.entry.reused),
        "boxes": sum(r.boxes for r in results if r.entry.ok),
        "bytes_fetched": sum(r.fetched_bytes for r in results),
        "tfrecord_bytes": len(payload),
        "tfrecord_sha256": hashlib.sha256(payload).hexdigest(),
        "duration_s": round(duration, 3),
        "images_per_s": round(len(results) / duration, 2) if duration > 0 else None,
        "retry_failed": task.retry_failed,
        "worker": ctx.worker,
    }
    await loop.run_in_executor(None, st.write_json, urls["stats"], stats)
    return stats
