"""S3-compatible stores (AWS, SeaweedFS, MinIO, GCS interop) through boto3."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from openimages_od.storage.base import (
    AccessDenied,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    retry_call,
    split_s3_url,
)
from openimages_od.storage.options import S3Options

T = TypeVar("T")

__all__ = ["S3Backend"]


_S3_CLIENTS: dict[tuple[int, str], Any] = {}
_S3_LOCK = threading.Lock()


def _s3_client(opts: S3Options) -> Any:
    key = (os.getpid(), opts.model_dump_json())
    client = _S3_CLIENTS.get(key)
    if client is not None:
        return client
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config as BotoConfig

            bc = BotoConfig(
                signature_version=UNSIGNED if opts.unsigned else None,
                connect_timeout=opts.connect_timeout_s,
                read_timeout=opts.read_timeout_s,
                # Retries happen in retry_call (one place, capped backoff).
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=opts.max_pool_connections,
                s3={"addressing_style": opts.addressing_style},
            )
            session = (
                boto3.session.Session(profile_name=opts.profile) if opts.profile else boto3.session.Session()
            )
            client = session.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=bc)
            _S3_CLIENTS[key] = client
    return client


_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "503",
    "500",
    "502",
    "504",
}


def _translate_s3(exc: Exception, url: str) -> StorageError:
    from botocore import exceptions as be

    if isinstance(exc, be.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(url)
        if code == "NoSuchBucket":
            return ObjectNotFound(url, "no such bucket")
        if code in (
            "AccessDenied",
            "403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AllAccessDisabled",
        ):
            return AccessDenied(url, f"access denied ({code})")
        if code in _TRANSIENT_CODES or (status and int(status) >= 500):
            return TransientStorageError(url, f"S3 error {code or status}")
        return StorageError(f"S3 error {code or status}: {exc}", url)
    if isinstance(
        exc,
        (
            be.EndpointConnectionError,
            be.ConnectTimeoutError,
            be.ReadTimeoutError,
            be.ConnectionClosedError,
            be.ConnectionError,
        ),
    ):
        return TransientStorageError(url, f"cannot reach the S3 endpoint ({type(exc).__name__})")
    if isinstance(exc, be.NoCredentialsError):
        return AccessDenied(
            url,
            "no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or s3.unsigned)",
        )
    if isinstance(exc, be.BotoCoreError):
        return StorageError(f"S3 client error ({exc})", url)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientStorageError(url, f"connection failed ({exc})")
    return StorageError(f"S3 operation failed ({type(exc).__name__}: {exc})", url)


class S3Backend:
    """``s3://`` through boto3; every call translated and retried by :func:`retry_call`."""

    def __init__(self, opts: S3Options) -> None:
        self.opts = opts

    @property
    def client(self) -> Any:
        return _s3_client(self.opts)

    def _call(self, url: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                raise _translate_s3(exc, url) from exc

        return retry_call(once, attempts=self.opts.max_attempts)

    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        bucket, key = split_s3_url(url)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start is not None:
            kw["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{max(start, end - 1)}"
            if end is not None and end <= start:
                return b""

        def get() -> bytes:
            resp = self.client.get_object(**kw)
            return bytes(resp["Body"].read())

        return self._call(url, get)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(
            multipart_threshold=self.opts.multipart_threshold_mb * mb,
            multipart_chunksize=max(8, self.opts.multipart_threshold_mb // 4) * mb,
            use_threads=True,
        )

    def upload_file(self, local: Path, url: str) -> None:
        bucket, key = split_s3_url(url)
        self._call(
            url, lambda: self.client.upload_file(str(local), bucket, key, Config=self._transfer_config())
        )

    def write_bytes(self, url: str, data: bytes) -> None:
        bucket, key = split_s3_url(url)
        if len(data) >= self.opts.multipart_threshold_mb * 1024 * 1024:
            import io

            self._call(
                url,
                lambda: self.client.upload_fileobj(
                    io.BytesIO(data), bucket, key, Config=self._transfer_config()
                ),
            )
        else:
            self._call(url, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        fd, tmp = tempfile.mkstemp(prefix="oiod-upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            self.upload_file(Path(tmp), url)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def download_file(self, url: str, dest: Path) -> None:
        bucket, key = split_s3_url(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        self._call(
            url, lambda: self.client.download_file(bucket, key, str(tmp), Config=self._transfer_config())
        )
        os.replace(tmp, dest)

    def exists(self, url: str) -> bool:
        try:
            self.size(url)
            return True
        except ObjectNotFound:
            return False

    def size(self, url: str) -> int:
        bucket, key = split_s3_url(url)
        return int(self._call(url, lambda: self.client.head_object(Bucket=bucket, Key=key))["ContentLength"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3_url(prefix)

        def pages() -> list[ObjectInfo]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
            return out

        yield from sorted(self._call(prefix, pages), key=lambda o: o.url)

    def delete(self, url: str) -> None:
        bucket, key = split_s3_url(url)
        self._call(url, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def put_conditional(self, url: str, data: bytes, *, if_match: str | None) -> str | None:
        """PutObject with ``If-None-Match: *`` (``if_match`` None) or ``If-Match: etag``; None if it did not hold."""
        from botocore import exceptions as be

        bucket, key = split_s3_url(url)
        cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}

        def put() -> str | None:
            try:
                return str(self.client.put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"])
            except be.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return None
                raise

        return self._call(url, put)

    def read_with_etag(self, url: str) -> tuple[bytes, str]:
        bucket, key = split_s3_url(url)

        def get() -> tuple[bytes, str]:
            r = self.client.get_object(Bucket=bucket, Key=key)
            return r["Body"].read(), str(r["ETag"])

        return self._call(url, get)
