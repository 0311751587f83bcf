"""Fetching image bytes: the public S3 bucket (boto3 in a thread pool) and HTTP (aiohttp).

One :class:`Fetcher` lives in each download actor and is shared by every
shard the actor works on: one pooled aiohttp session (a global and a per-host
connection limit), one thread pool for the synchronous boto3 client.

Per-image failures are :class:`FetchFailed` with a stable ``reason`` (the
ledger's ``error``): ``no_url``, ``http_404``/``http_403``/``http_410``/
``http_<code>``, ``timeout``, ``connection``, ``truncated``, ``too_large``,
``redirect_loop``, ``too_many_redirects``, ``placeholder_redirect``,
``s3_not_found``, ``s3_access_denied``, ``s3_error``.

HTTP retry policy (``source.images.http``): timeouts, connection errors,
truncated bodies, 5xx and 429 are retried up to ``max_retries`` times with
capped exponential backoff and full jitter; a ``Retry-After`` header (seconds
or an HTTP date) is honoured up to ``max_retry_after_s``. 403/404/410 and
other 4xx are final. S3 retries happen in :func:`openimages_od.storage.retry_call`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urljoin

from openimages_od.config import ImageSources
from openimages_od.storage import AccessDenied, ObjectNotFound, Storage, StorageError

__all__ = ["FetchFailed", "Fetched", "Fetcher", "source_url", "parse_retry_after", "backoff_s"]

_DEFAULT_KEY_TEMPLATE = "{split}/{image_id}.jpg"


class FetchFailed(Exception):
    """One source could not deliver the image.

    Attributes:
        reason: stable reason code.
        detail: human-readable detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Fetched:
    data: bytes
    source: str
    url: str
    final_url: str
    attempts: int


def source_url(source: str, row: dict[str, Any], sources: ImageSources) -> Optional[str]:
    """The URL of ``source`` ("bucket", "original", "thumbnail") for a plan row, or None."""
    if source == "bucket":
        template = sources.key_template
        if template == _DEFAULT_KEY_TEMPLATE and row.get("bucket_key"):
            key = row["bucket_key"]
        else:  # a mirror with its own layout: the configured template wins over the plan's key
            key = template.format(split=row["split"], image_id=row["image_id"])
        return f"s3://{sources.bucket}/{key.lstrip('/')}"
    if source == "original":
        return row.get("original_url") or None
    if source == "thumbnail":
        return row.get("thumbnail_url") or None
    raise ValueError(f"unknown image source {source!r}")


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Full-jitter exponential backoff for retry number ``attempt`` (1-based)."""
    return rng(0, min(cap_s, base_s * (2 ** (attempt - 1))))


class _Retry(Exception):
    def __init__(self, reason: str, detail: str = "", wait_s: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.wait_s = wait_s


class Fetcher:
    """Async fetcher for one actor (create inside the running event loop).

    Args:
        sources: ``source.images`` config.
        concurrency: connection pool size (the actor's ``concurrency_per_actor``).
        storage: storage used for ``bucket`` fetches (defaults to one with ``sources.s3`` for the bucket).
    """

    def __init__(self, sources: ImageSources, concurrency: int = 32, storage: Optional[Storage] = None) -> None:
        self.sources = sources
        self.http = sources.http
        self.concurrency = concurrency
        self.storage = storage or Storage(bucket_options={sources.bucket: sources.s3})
        self._pool = ThreadPoolExecutor(max_workers=max(4, min(concurrency, 64)), thread_name_prefix="oiod-s3")
        self._session: Any = None

    async def _session_get(self) -> Any:
        if self._session is None:
            import aiohttp

            h = self.http
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=h.per_host_limit,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            timeout = aiohttp.ClientTimeout(total=h.total_timeout_s, sock_connect=h.connect_timeout_s,
                                            sock_read=h.read_timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                                  headers={"User-Agent": h.user_agent}, auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._pool.shutdown(wait=False)

    async def fetch(self, source: str, row: dict[str, Any]) -> Fetched:
        """Fetch one image from one source.

        Raises:
            FetchFailed: with the reason (after retries).
        """
        url = source_url(source, row, self.sources)
        if not url:
            raise FetchFailed("no_url", f"plan row has no {source} URL")
        if source == "bucket":
            return await self._fetch_s3(url)
        return await self._fetch_http(source, url)

    # ------------------------------------------------------------------ S3

    async def _fetch_s3(self, url: str) -> Fetched:
        loop = asyncio.get_running_loop()
        max_bytes = int(self.http.max_body_mb * 1024 * 1024)
        try:
            data = await loop.run_in_executor(self._pool, self.storage.read_bytes, url)
        except ObjectNotFound as exc:
            raise FetchFailed("s3_not_found", str(exc)) from None
        except AccessDenied as exc:
            raise FetchFailed("s3_access_denied", str(exc)) from None
        except StorageError as exc:
            raise FetchFailed("s3_error", str(exc)) from None
        if len(data) > max_bytes:
            raise FetchFailed("too_large", f"{len(data)} bytes > {max_bytes}")
        return Fetched(data, "bucket", url, url, 1)

    # ------------------------------------------------------------------ HTTP

    async def _fetch_http(self, source: str, url: str) -> Fetched:
        h = self.http
        attempt = 0
        while True:
            attempt += 1
            try:
                data, final_url = await self._http_once(url)
                return Fetched(data, source, url, final_url, attempt)
            except _Retry as r:
                if attempt > h.max_retries:
                    raise FetchFailed(r.reason, f"{r.detail} (after {attempt} attempts)") from None
                wait = backoff_s(attempt, h.backoff_base_s, h.backoff_max_s)
                if r.wait_s is not None:
                    wait = min(max(wait, r.wait_s), h.max_retry_after_s)
                await asyncio.sleep(wait)

    async def _http_once(self, url: str) -> tuple[bytes, str]:
        import aiohttp

        h = self.http
        session = await self._session_get()
        max_bytes = int(h.max_body_mb * 1024 * 1024)
        seen = {url}
        current = url
        try:
            for _ in range(h.max_redirects + 1):
                async with session.get(current, allow_redirects=False) as resp:
                    status = resp.status
                    if status in (301, 302, 303, 307, 308):
                        loc = resp.headers.get("Location")
                        if not loc:
                            raise FetchFailed(f"http_{status}", "redirect without Location")
                        nxt = urljoin(current, loc)
                        if "photo_unavailable" in nxt:
                            raise FetchFailed("placeholder_redirect", nxt)
                        if nxt in seen:
                            raise FetchFailed("redirect_loop", nxt)
                        seen.add(nxt)
                        current = nxt
                        continue
                    if status == 200:
                        length = resp.content_length
                        if length is not None and length > max_bytes:
                            raise FetchFailed("too_large", f"Content-Length {length} > {max_bytes}")
                        if length is not None:  # size known and acceptable: one read
                            data = await resp.read()
                        else:  # chunked: stop as soon as the limit is crossed
                            chunks = []
                            total = 0
                            async for chunk in resp.content.iter_chunked(1 << 16):
                                total += len(chunk)
                                if total > max_bytes:
                                    raise FetchFailed("too_large", f"body > {max_bytes} bytes")
                                chunks.append(chunk)
                            data = b"".join(chunks)
                        if length is not None and len(data) != length:
                            raise _Retry("truncated", f"{len(data)} of {length} bytes")
                        return data, current
                    if status == 429 or status >= 500:
                        raise _Retry(f"http_{status}", current, parse_retry_after(resp.headers.get("Retry-After")))
                    raise FetchFailed(f"http_{status}", current)
            raise FetchFailed("too_many_redirects", f"more than {h.max_redirects} redirects from {url}")
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise _Retry("timeout", f"{current}: {type(exc).__name__}") from None
        except aiohttp.ClientPayloadError as exc:
            raise _Retry("truncated", f"{current}: {exc}"[:200]) from None
        except aiohttp.InvalidURL as exc:
            raise FetchFailed("bad_url", str(exc)) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientResponseError, ConnectionError) as exc:
            raise _Retry("connection", f"{current}: {type(exc).__name__}: {exc}"[:200]) from None
