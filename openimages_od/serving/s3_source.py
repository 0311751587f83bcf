"""``s3://`` and ``gs://`` images named in requests: off by default, only under allowed prefixes, one bounded GET.

The service's S3 and GCS credentials belong to the operator, so a caller must
not be able to turn the service into a reader of every bucket those
credentials reach. Rules:

* refused (403, ``s3_not_allowed`` / ``gs_not_allowed``) unless
  ``serve.allowed_image_prefixes`` lists a prefix the URL starts with;
  prefixes are folders (``s3://b/img/``, ``gs://b/img/``), keys with empty,
  ``.`` or ``..`` segments or control characters are refused before the
  check, so a server that normalises paths cannot be steered outside;
* the answer for an object that is missing and for one the credentials cannot
  read is the same (422, no size, no S3 error text), and nothing about objects
  outside the allowed prefixes is ever looked up;
* one GET, no HEAD first (no time-of-check/time-of-use): the object is signed
  with botocore (a local computation, on the ``fetch`` pool because the
  credential chain may refresh over the network) and read on the event loop
  with aiohttp, cut off at ``max_bytes`` and bounded by ``timeout_s``.
  Cancelling the read closes the connection, so a stalling endpoint costs one
  socket until the deadline and no thread at all;
* ``gs://`` objects are read with the storage layer's GCS backend (one ranged
  read of at most ``max_bytes + 1`` bytes, one attempt, the request's timeout)
  on the ``fetch`` pool.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiohttp
from yarl import URL

from openimages_od.serving.errors import ApiError
from openimages_od.serving.pools import WorkPool

__all__ = ["S3ImageSource"]

_MAX_URL = 1100  # S3 keys are at most 1,024 bytes, GCS object names 1,024
_SCHEMES = ("s3://", "gs://")


class S3ImageSource:
    """Reads ``s3://`` and ``gs://`` image URLs for the service under the rules in the module docstring.

    Args:
        prefixes: allowed ``s3://`` or ``gs://bucket/prefix/`` folders (empty: every such URL refused).
        storage: the service's :class:`openimages_od.storage.Storage` (endpoint, credentials per bucket).
        max_bytes: object size limit (413 above it).
        timeout_s: limit for signing plus reading (504).
        pool: the pool signing runs on.
    """

    def __init__(
        self, prefixes: list[str], storage: Any, max_bytes: int, timeout_s: float, pool: WorkPool
    ) -> None:
        self.prefixes = [p if p.endswith("/") else p + "/" for p in prefixes]
        self.storage = storage
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.pool = pool
        self._signers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None

    def check(self, url: str) -> tuple[str, str]:
        """``(bucket, key)`` of an allowed URL; 400 for a malformed one, 403 outside the prefixes."""
        scheme = url[:5].lower() if url[:5].lower() in _SCHEMES else "s3://"
        name = scheme[:2]
        bad = f"not a valid {scheme}bucket/key URL"
        if not self.prefixes:
            raise ApiError(
                403,
                f"{name}_not_allowed",
                f"{scheme} image URLs are not enabled on this server (see serve.allowed_image_prefixes)",
            )
        if len(url) > _MAX_URL or any(ord(c) < 0x20 or c in "\\\x7f" for c in url):
            raise ApiError(400, "bad_url", bad)
        bucket, _, key = url[len(scheme) :].partition("/")
        if not bucket or not key:
            raise ApiError(400, "bad_url", bad)
        if any(seg in ("", ".", "..") for seg in key.split("/")):
            raise ApiError(
                400, "bad_url", f"{scheme} keys with empty, '.' or '..' path segments are not accepted"
            )
        if not any(url.startswith(p) for p in self.prefixes):
            raise ApiError(
                403, f"{name}_not_allowed", f"this server may not read images from that {scheme} location"
            )
        return bucket, key

    def _signer(self, bucket: str) -> Any:
        from openimages_od.storage import S3Options

        opts = S3Options()
        if self.storage is not None:
            opts = self.storage.bucket_options.get(bucket, self.storage.s3_default)
        cache_key = opts.model_dump_json()
        with self._lock:
            client = self._signers.get(cache_key)
            if client is None:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config as BotoConfig

                # Only signs (no request is sent with it); the timeouts and single attempt bound the
                # credential-chain calls it may make (instance metadata, STS web identity).
                bc = BotoConfig(
                    signature_version=UNSIGNED if opts.unsigned else "s3v4",
                    connect_timeout=min(opts.connect_timeout_s, self.timeout_s),
                    read_timeout=min(opts.read_timeout_s, self.timeout_s),
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    max_pool_connections=self.pool.workers,
                    s3={"addressing_style": opts.addressing_style},
                )
                session = (
                    boto3.session.Session(profile_name=opts.profile)
                    if opts.profile
                    else boto3.session.Session()
                )
                client = session.client(
                    "s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=bc
                )
                self._signers[cache_key] = client
        return client

    def _presign(self, bucket: str, key: str) -> str:
        return self._signer(bucket).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=max(60, int(self.timeout_s) * 2)
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Not the SSRF-guarded session: the host is the operator's configured endpoint, the caller
            # picks only an allowed bucket and key. No decompression: bytes are bounded as stored.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4 * self.pool.workers),
                trust_env=False,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=min(5.0, self.timeout_s), sock_read=self.timeout_s
                ),
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        """The object's bytes.

        Raises:
            ApiError: 400 malformed URL, 403 not allowed, 413 too large, 422 unreadable (missing or
                denied alike) or endpoint failure, 504 timeout.
        """
        bucket, key = self.check(url)
        if url[:5].lower() == "gs://":
            return await self._fetch_gcs(bucket, key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            signed = await self.pool.run(self._presign, bucket, key, timeout_s=self.timeout_s)
        except ApiError as exc:
            if exc.status == 504:
                raise ApiError(
                    504, "fetch_timeout", f"fetching the image took longer than {self.timeout_s:g}s"
                ) from None
            raise
        except Exception as exc:
            raise ApiError(
                422, "fetch_failed", f"the S3 object could not be read ({type(exc).__name__})"
            ) from None
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                return await self._get(signed)
        except TimeoutError:
            raise ApiError(
                504, "fetch_timeout", f"fetching the image took longer than {self.timeout_s:g}s"
            ) from None

    def _read_gcs(self, bucket: str, key: str) -> bytes:
        from openimages_od.storage import GcsOptions
        from openimages_od.storage.gcs import GcsBackend

        opts = GcsOptions()
        if self.storage is not None:
            opts = self.storage.gcs_bucket_options.get(bucket, self.storage.gcs_default)
        # One attempt within the request's deadline: the caller retries, not a pool thread.
        tight = opts.model_copy(update={"timeout_s": min(opts.timeout_s, self.timeout_s), "max_attempts": 1})
        return GcsBackend(tight).read_bytes(f"gs://{bucket}/{key}", 0, self.max_bytes + 1)

    async def _fetch_gcs(self, bucket: str, key: str) -> bytes:
        try:
            data = await self.pool.run(self._read_gcs, bucket, key, timeout_s=self.timeout_s)
        except ApiError as exc:
            if exc.status == 504:
                raise ApiError(
                    504, "fetch_timeout", f"fetching the image took longer than {self.timeout_s:g}s"
                ) from None
            raise
        except Exception:
            # Missing, denied and unreachable read the same (422): neither existence nor the store's
            # message (nor the error class, which would tell missing from denied) is revealed.
            raise ApiError(422, "fetch_failed", "the GCS object could not be read") from None
        if len(data) > self.max_bytes:
            raise ApiError(413, "image_too_large", f"the image exceeds the limit of {self.max_bytes} bytes")
        return data

    async def _get(self, signed: str) -> bytes:
        try:
            async with self._get_session().get(URL(signed, encoded=True), allow_redirects=False) as resp:
                if resp.status != 200:
                    # 403 and 404 (and anything else) read the same: existence is not revealed.
                    raise ApiError(422, "fetch_failed", "the S3 object could not be read")
                if resp.content_length is not None and resp.content_length > self.max_bytes:
                    raise ApiError(
                        413, "image_too_large", f"the image exceeds the limit of {self.max_bytes} bytes"
                    )
                chunks, total = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ApiError(
                            413, "image_too_large", f"the image exceeds the limit of {self.max_bytes} bytes"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                422, "fetch_failed", f"the S3 endpoint could not be read ({type(exc).__name__})"
            ) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
