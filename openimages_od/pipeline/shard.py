"""One shard end to end: plan rows -> cache or fetch -> verify -> orient/resize -> record -> writer -> commit.

Pure of Ray: :func:`run_shard` is a coroutine that the Ray actor (or a test,
or a benchmark) runs inside its event loop. Commit protocol, per shard
(paths from :class:`openimages_od.layout.Layout`):

0. the plan shard's bytes are checked against the sha256 the manifest names
   (a plan rewritten under a running prepare fails the shard, never mixes plans),
   and the shard's old stats are deleted (so no stats ever describes other bytes),
1. the shard file (atomic write), in the format ``shards.format`` names: a
   :class:`~openimages_od.pipeline.writers.ShardWriter` turns the records into
   the file's bytes and does nothing else,
2. the ledger (one line per plan row, plan order),
3. ``{split}-{i:05d}-of-{n:05d}.stats.json`` last, naming the shard key
   (:func:`openimages_od.layout.shard_key`), the format and the file's sha256:
   the shard is committed for this plan.

Each image is looked up in the image cache (:mod:`.cache`) first; only a miss
is fetched from its sources, and what was fetched is cached for every later
plan.

Records are written in plan order (ImageID), and each record depends only on
the plan row and the source bytes, so the shard bytes are identical whatever
the worker count, timing or retries (writers must be deterministic too).
``retry_failed`` re-fetches only the images the ledger records as failed and
reuses the other records byte for byte from the existing shard (read back by
the same writer).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from openimages_od.config import Config
from openimages_od.errors import DataError
from openimages_od.layout import SHARD_KEY_FIELD, Layout
from openimages_od.openimages.planio import shard_name
from openimages_od.pipeline.cache import CacheEntry, ImageCache
from openimages_od.pipeline.fetch import Fetcher, FetchFailed
from openimages_od.pipeline.geometry import Op
from openimages_od.pipeline.ledger import LedgerEntry, decode_ledger, encode_ledger
from openimages_od.pipeline.transform import record_from, transform_image
from openimages_od.pipeline.verify import Rejected
from openimages_od.pipeline.writers import Sample, resolve_writer, write_shard
from openimages_od.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

__all__ = ["ShardContext", "ShardTask", "run_shard", "shard_urls"]


@dataclass(frozen=True)
class ShardTask:
    """One unit of work and retry."""

    split: str
    index: int
    num_shards: int
    plan_url: str  # the plan shard (Parquet)
    retry_failed: bool = False
    plan_sha256: str = ""  # what the plan shard's bytes must hash to ("" = not checked)
    key: str = ""  # the shard key recorded in the stats (layout.shard_key)
    plan_digest: str = ""  # the whole plan's digest, recorded in the stats

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.num_shards)


def shard_urls(cfg: Config, split: str, index: int, num_shards: int) -> dict[str, str]:
    """URLs of a shard's file (``file``), stats and ledger."""
    return Layout.from_config(cfg).shard_urls(split, shard_name(split, index, num_shards))


@dataclass
class ShardContext:
    """What a worker shares between its shards."""

    cfg: Config
    storage: Storage
    fetcher: Fetcher
    cpu_pool: Executor
    semaphore: asyncio.Semaphore
    on_image: Callable[[bool, int], None] | None = None  # (ok, bytes) per finished image
    worker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    cache: ImageCache | None = None  # None = output.image_cache off


# Plan rows per cache lookup / record-building batch: big enough to amortize the thread
# hand-off, small enough that the first fetches start while later chunks are looked up.
_CHUNK = 64
_PUT_BATCH = 32  # cache entries per write batch


class _CachePuts:
    """A shard's image cache writes, in batches on a thread, at most one batch in flight.

    A worker that dies mid-shard loses at most the unwritten batch (those images are
    fetched again by the retry); a failed write fails the shard, as a single write did.
    """

    def __init__(self, cache: ImageCache, loop: asyncio.AbstractEventLoop) -> None:
        self._cache = cache
        self._loop = loop
        self._pending: list[CacheEntry] = []
        self._flight: asyncio.Future[None] | None = None

    def add(self, entry: CacheEntry) -> None:
        self._pending.append(entry)
        if len(self._pending) >= _PUT_BATCH and (self._flight is None or self._flight.done()):
            self._start()

    def _start(self) -> None:
        if self._flight is not None:
            self._flight.result()  # the previous batch's error, if it failed
        batch, self._pending = self._pending, []
        self._flight = self._loop.run_in_executor(None, self._cache.put_many, batch)

    async def drain(self) -> None:
        """Write what is pending and wait for every batch (raises a failed write's error)."""
        if self._flight is not None:
            await self._flight
        if self._pending:
            self._start()
            assert self._flight is not None
            await self._flight


@dataclass
class ImageResult:
    entry: LedgerEntry
    record: bytes | None = None
    fetched_bytes: int = 0
    boxes: int = 0
    cached: CacheEntry | None = None  # what to put in the image cache (a fresh fetch)


def _from_cache(row: dict[str, Any], ce: CacheEntry) -> ImageResult:
    """A record (or a recorded failure) rebuilt from a cache entry: CPU only, no request."""
    n_boxes = len(row.get("boxes") or [])
    if not ce.ok:
        e = LedgerEntry(
            image_id=row["image_id"],
            status="failed",
            error=ce.error,
            attempts=list(ce.attempts),
            from_cache=True,
        )
        return ImageResult(e, None, 0, 0)
    # ce.sha256 was checked against ce.data when the entry was read (cache.decode_entry).
    record = record_from(row, ce.data, ce.width, ce.height, [Op(v) for v in ce.ops], ce.sha256)
    e = LedgerEntry(
        image_id=row["image_id"],
        status="ok",
        source=ce.source,
        url=ce.url,
        bytes=ce.bytes,
        width=ce.width,
        height=ce.height,
        kept_original=ce.kept_original,
        attempts=list(ce.attempts),
        from_cache=True,
    )
    return ImageResult(e, record, 0, n_boxes)


async def _one(row: dict[str, Any], ctx: ShardContext) -> ImageResult:
    cfg = ctx.cfg
    loop = asyncio.get_running_loop()
    attempts: list[str] = []
    fetched_bytes = 0
    async with ctx.semaphore:
        for source in cfg.source.images.order:
            try:
                fetched = await ctx.fetcher.fetch(source, row)
            except FetchFailed as exc:
                attempts.append(f"{source}:{exc.reason}")
                continue
            fetched_bytes += len(fetched.data)
            try:
                record, entry, cached = await loop.run_in_executor(
                    ctx.cpu_pool, transform_image, fetched, row, cfg.image
                )
            except Rejected as exc:
                attempts.append(f"{source}:{exc.reason}")
                continue
            entry.attempts = attempts
            cached.attempts = list(attempts)
            return ImageResult(entry, record, fetched_bytes, len(row.get("boxes") or []), cached)
    # The last source's reason, unless it merely had no URL (then the one before it).
    reasons = [a.split(":", 1)[1] for a in attempts]
    informative = [r for r in reasons if r != "no_url"]
    error = informative[-1] if informative else (reasons[-1] if reasons else "no_source")
    failed = CacheEntry(
        image_id=row["image_id"],
        status="failed",
        rotation=row.get("rotation"),
        original_md5=row.get("original_md5"),
        error=error,
        attempts=list(attempts),
    )
    return ImageResult(
        LedgerEntry(image_id=row["image_id"], status="failed", error=error, attempts=attempts),
        None,
        fetched_bytes,
        0,
        failed,
    )


async def _read_previous(
    task: ShardTask, ctx: ShardContext, urls: dict[str, str]
) -> tuple[dict[str, bytes], dict[str, LedgerEntry]]:
    """Records and ledger entries of the existing shard (for ``retry_failed``)."""
    loop = asyncio.get_running_loop()
    st = ctx.storage
    try:
        ledger_raw = await loop.run_in_executor(None, st.read_bytes, urls["ledger"])
        data = await loop.run_in_executor(None, st.read_bytes, urls["file"])
    except ObjectNotFound:
        return {}, {}
    ledger = {e.image_id: e for e in decode_ledger(ledger_raw)}
    writer = resolve_writer(ctx.cfg.shards.format)
    samples = await loop.run_in_executor(ctx.cpu_pool, lambda: list(writer.read(data, urls["file"])))
    return {s.image_id: s.example for s in samples}, ledger


async def run_shard(task: ShardTask, ctx: ShardContext) -> dict[str, Any]:
    """Produce and commit one shard; returns its stats (also written as ``.stats.json``).

    Per-image failures are recorded in the ledger; storage errors (reading the
    plan, writing outputs) raise, and the caller retries the whole shard.
    """
    t0 = time.monotonic()
    cfg, st = ctx.cfg, ctx.storage
    loop = asyncio.get_running_loop()
    urls = shard_urls(cfg, task.split, task.index, task.num_shards)
    plan_bytes = await loop.run_in_executor(None, st.read_bytes, task.plan_url)
    if task.plan_sha256 and hashlib.sha256(plan_bytes).hexdigest() != task.plan_sha256:
        raise DataError(
            f"{task.plan_url} is not the plan shard this prepare started from (the plan was "
            f"rewritten while prepare ran); rerun `oiod prepare`"
        )
    rows = pq.ParquetFile(io.BytesIO(plan_bytes)).read().to_pylist()  # ParquetFile: no pyarrow.dataset import
    rows.sort(key=lambda r: r["image_id"])
    for r in rows:
        if r["split"] != task.split:
            raise DataError(
                f"{task.plan_url}: row {r['image_id']} has split {r['split']!r}, expected {task.split!r}"
            )

    reuse: dict[str, bytes] = {}
    old: dict[str, LedgerEntry] = {}
    if task.retry_failed:
        reuse, old = await _read_previous(task, ctx, urls)

    cache = ctx.cache
    puts = _CachePuts(cache, loop) if cache is not None else None

    async def fetch_one(row: dict[str, Any]) -> ImageResult:
        res = await _one(row, ctx)
        if puts is not None and res.cached is not None:
            puts.add(res.cached)
        return _done(res)

    def _done(res: ImageResult) -> ImageResult:
        if ctx.on_image is not None:
            ctx.on_image(res.entry.ok, res.fetched_bytes)
        return res

    async def chunk(part: list[dict[str, Any]]) -> list[ImageResult]:
        # One cache lookup and one record-building call per chunk, not per image (see .cache).
        done: dict[int, ImageResult] = {}  # by position in the chunk
        todo: list[int] = []
        for i, row in enumerate(part):
            prev = old.get(row["image_id"])
            if prev is not None and prev.ok and row["image_id"] in reuse:
                e = LedgerEntry(**{**prev.__dict__, "reused": True})
                done[i] = _done(ImageResult(e, reuse[row["image_id"]], 0, len(row.get("boxes") or [])))
            else:
                todo.append(i)
        if cache is not None and todo:
            found = await loop.run_in_executor(None, cache.get_many, [part[i]["image_id"] for i in todo])
            hits = [
                (i, ce)
                for i, ce in zip(todo, found, strict=True)
                if ce is not None and ce.matches(part[i]) and (ce.ok or not task.retry_failed)
            ]
            if hits:
                built = await loop.run_in_executor(
                    ctx.cpu_pool, lambda: [_from_cache(part[i], ce) for i, ce in hits]
                )
                for (i, _), res in zip(hits, built, strict=True):
                    done[i] = _done(res)
        misses = [i for i in todo if i not in done]
        for i, res in zip(misses, await asyncio.gather(*(fetch_one(part[i]) for i in misses)), strict=True):
            done[i] = res
        return [done[i] for i in range(len(part))]

    parts = [rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
    results = [res for part in await asyncio.gather(*(chunk(p) for p in parts)) for res in part]
    if puts is not None:
        await puts.drain()  # every image fetched for this shard is cached before the shard commits
    samples = [Sample(r.entry.image_id, r.record) for r in results if r.record is not None]
    writer = resolve_writer(cfg.shards.format)
    payload = await loop.run_in_executor(ctx.cpu_pool, write_shard, writer, task.name, samples)
    payload_sha256 = hashlib.sha256(payload).hexdigest()

    await loop.run_in_executor(None, st.delete, urls["stats"])
    await loop.run_in_executor(None, st.write_bytes, urls["file"], payload)
    await loop.run_in_executor(None, st.write_bytes, urls["ledger"], encode_ledger(r.entry for r in results))

    duration = time.monotonic() - t0
    ok = sum(1 for r in results if r.entry.ok)
    fetched = [r for r in results if not r.entry.from_cache and not r.entry.reused]
    stats = {
        "format": 3,  # 3: shard_format, file, file_bytes, file_sha256
        SHARD_KEY_FIELD: task.key,
        "plan_digest": task.plan_digest,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "split": task.split,
        "shard": task.index,
        "num_shards": task.num_shards,
        "name": task.name,
        "shard_format": cfg.shards.format,
        "file": urls["file"],
        "ledger": urls["ledger"],
        "images": len(results),
        "ok": ok,
        "failed": len(results) - ok,
        "failed_by_reason": dict(sorted(Counter(r.entry.error for r in results if not r.entry.ok).items())),
        "sources": dict(sorted(Counter(r.entry.source for r in results if r.entry.ok).items())),
        "kept_original": sum(1 for r in results if r.entry.kept_original),
        "reused": sum(1 for r in results if r.entry.reused),
        "cache_hits": sum(1 for r in results if r.entry.from_cache),
        "source_fetches": len(fetched),
        "boxes": sum(r.boxes for r in results if r.entry.ok),
        "bytes_fetched": sum(r.fetched_bytes for r in results),
        "records": len(samples),
        "file_bytes": len(payload),
        "file_sha256": payload_sha256,
        "duration_s": round(duration, 3),
        "images_per_s": round(len(results) / duration, 2) if duration > 0 else None,
        "retry_failed": task.retry_failed,
        "worker": ctx.worker,
    }
    if writer.extension == "tfrecord":
        # The names readers of stats written before shards.format existed look for.
        stats.update(tfrecord=urls["file"], tfrecord_bytes=len(payload), tfrecord_sha256=payload_sha256)
    await loop.run_in_executor(None, st.write_json, urls["stats"], stats)
    return stats
