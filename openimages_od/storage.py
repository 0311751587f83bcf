"""One storage layer over URLs, used by every stage.

Supported locations:

* local: ``/abs/path``, ``relative/path`` or ``file:///abs/path``
* S3-compatible: ``s3://bucket/key`` through boto3 (AWS, SeaweedFS, MinIO, ...)
* ``http(s)://``: read-only (metadata downloads)

Writes are atomic: a local write goes to a temporary file in the same folder,
is fsynced and renamed; an S3 write becomes visible only when its single PUT or
multipart upload completes. Backend errors become :class:`StorageError`
subclasses (all ``OSError``) that name the URL and keep the cause. Transient
errors (connection failures, timeouts, throttling, 5xx) are retried here, in
one place, with capped exponential backoff and jitter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from openimages_od.config import Config, S3Options

T = TypeVar("T")

__all__ = [
    "AccessDenied",
    "ObjectInfo",
    "ObjectNotFound",
    "ReadOnlyLocation",
    "Storage",
    "StorageError",
    "TransientStorageError",
    "local_path",
    "retry_call",
    "split_s3_url",
]


# --------------------------------------------------------------------------- errors


class StorageError(OSError):
    """A storage operation failed. ``url`` names the object; ``__cause__`` keeps the backend error."""

    def __init__(self, message: str, url: str, *, err: int = errno.EIO) -> None:
        super().__init__(err, f"{message}: {url}")
        self.url = url

    def __str__(self) -> str:  # OSError's default adds "[Errno N]"; keep it readable
        return self.strerror or super().__str__()


class ObjectNotFound(StorageError, FileNotFoundError):
    def __init__(self, url: str, message: str = "no such object") -> None:
        super().__init__(message, url, err=errno.ENOENT)


class AccessDenied(StorageError, PermissionError):
    def __init__(self, url: str, message: str = "access denied") -> None:
        super().__init__(message, url, err=errno.EACCES)


class TransientStorageError(StorageError, ConnectionError):
    """Retryable: connection refused/reset, timeouts, throttling, 5xx."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message, url, err=errno.EAGAIN)


class ReadOnlyLocation(StorageError):
    def __init__(self, url: str) -> None:
        super().__init__("location is read-only (http is for reading)", url, err=errno.EROFS)


# --------------------------------------------------------------------------- retry


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_s: float = 0.2,
    cap_s: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = (TransientStorageError,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` and retry on ``retry_on`` with capped exponential backoff and full jitter.

    Args:
        fn: the operation.
        attempts: total attempts (>= 1).
        base_s: first backoff ceiling; doubles per attempt.
        cap_s: largest backoff.
        retry_on: exception types worth retrying; anything else propagates at once.
        sleep: injectable for tests.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on:
            if attempt >= attempts:
                raise
            sleep(random.uniform(0, min(cap_s, base_s * (2 ** (attempt - 1)))))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise StorageError("not an s3://bucket/key URL", url, err=errno.EINVAL)
    return p.netloc, p.path.lstrip("/")


def local_path(url: str) -> Path | None:
    """The filesystem path for a local URL, or None for remote URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url:
        return None
    return Path(url).absolute()


def _scheme(url: str) -> str:
    if url.startswith("file://") or "://" not in url:
        return "file"
    s = urlparse(url).scheme.lower()
    if s in ("s3", "http", "https"):
        return s
    raise StorageError(
        f"unsupported URL scheme {s!r} (use a path, file://, s3:// or http(s)://)", url, err=errno.EINVAL
    )


# --------------------------------------------------------------------------- backends


class _LocalBackend:
    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        path = local_path(url)
        assert path is not None
        try:
            with open(path, "rb") as fh:
                if start is None:
                    return fh.read()
                fh.seek(start)
                return fh.read(None if end is None else max(0, end - start))
        except FileNotFoundError as exc:
            raise ObjectNotFound(url) from exc
        except IsADirectoryError as exc:
            raise StorageError("is a directory", url, err=errno.EISDIR) from exc
        except PermissionError as exc:
            raise AccessDenied(url) from exc
        except OSError as exc:
            raise StorageError(f"read failed ({exc.strerror or exc})", url) from exc

    def _commit_file(self, tmp: Path, url: str) -> None:
        path = local_path(url)
        assert path is not None
        os.replace(tmp, path)

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        path = local_path(url)
        assert path is not None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except PermissionError as exc:
            raise AccessDenied(url) from exc
        except OSError as exc:
            raise StorageError(f"cannot create ({exc.strerror or exc})", url) from exc
        ok = False
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            ok = True
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"write failed ({exc.strerror or exc})", url) from exc
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def upload_file(self, local: Path, url: str) -> None:
        with self.writer(url) as fh, open(local, "rb") as src:
            shutil.copyfileobj(src, fh, 8 << 20)

    def download_file(self, url: str, dest: Path) -> None:
        path = local_path(url)
        assert path is not None
        if not path.exists():
            raise ObjectNotFound(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def exists(self, url: str) -> bool:
        path = local_path(url)
        return bool(path and path.is_file())

    def size(self, url: str) -> int:
        path = local_path(url)
        try:
            return path.stat().st_size  # type: ignore[union-attr]
        except FileNotFoundError as exc:
            raise ObjectNotFound(url) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        path = local_path(prefix)
        assert path is not None
        scheme_prefix = "file://" if prefix.startswith("file://") else ""
        # S3 prefix semantics: "a/x/" lists the folder, "a/x" also matches "a/xy/...".
        if prefix.endswith("/"):
            root, stem = path, ""
        else:
            root, stem = path.parent, path.name
        if not root.is_dir():
            return
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            if rel_dir == Path(".") and stem:
                dirnames[:] = [d for d in dirnames if d.startswith(stem)]
                filenames = [f for f in filenames if f.startswith(stem)]
            for f in filenames:
                if f.startswith(".") and f.endswith(".tmp"):
                    continue  # in-progress atomic writes
                full = Path(dirpath) / f
                out.append(
                    ObjectInfo(f"{scheme_prefix}{full}" if scheme_prefix else str(full), full.stat().st_size)
                )
        yield from sorted(out, key=lambda o: o.url)

    def delete(self, url: str) -> None:
        path = local_path(url)
        assert path is not None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_S3_CLIENTS: dict[tuple, Any] = {}
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


class _S3Backend:
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
            return resp["Body"].read()

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


class _HttpBackend:
    def __init__(self, timeout_s: float = 60.0, attempts: int = 4) -> None:
        self.timeout_s = timeout_s
        self.attempts = attempts

    def _open(self, url: str, headers: dict[str, str]) -> Any:
        req = urllib.request.Request(url, headers={"User-Agent": "openimages-od/0.1", **headers})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise ObjectNotFound(url, f"HTTP {exc.code}") from exc
            if exc.code in (401, 403):
                raise AccessDenied(url, f"HTTP {exc.code}") from exc
            if exc.code == 429 or exc.code >= 500:
                raise TransientStorageError(url, f"HTTP {exc.code}") from exc
            raise StorageError(f"HTTP {exc.code}", url) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise TransientStorageError(url, f"cannot reach host ({getattr(exc, 'reason', exc)})") from exc

    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"

        def get() -> bytes:
            with self._open(url, headers) as resp:
                data = resp.read()
                if start is not None and resp.status == 200:  # server ignored Range
                    return data[start:end]
                return data

        return retry_call(get, attempts=self.attempts)

    def download_file(self, url: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")

        def get() -> None:
            with self._open(url, {}) as resp, open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)

        retry_call(get, attempts=self.attempts)
        os.replace(tmp, dest)

    def exists(self, url: str) -> bool:
        try:
            with self._open(url, {"Range": "bytes=0-0"}):
                return True
        except ObjectNotFound:
            return False

    def size(self, url: str) -> int:
        with self._open(url, {}) as resp:
            length = resp.headers.get("Content-Length")
            if length is None:
                raise StorageError("server sent no Content-Length", url)
            return int(length)


# --------------------------------------------------------------------------- facade


class Storage:
    """URL-addressed storage. One instance is cheap; clients are cached per process.

    Args:
        s3: default options for ``s3://`` URLs.
        bucket_options: per-bucket options (e.g. the unsigned public image bucket).
        http_timeout_s: timeout for ``http(s)://`` reads.
    """

    def __init__(
        self,
        s3: S3Options | None = None,
        bucket_options: dict[str, S3Options] | None = None,
        http_timeout_s: float = 60.0,
    ) -> None:
        self.s3_default = s3 or S3Options()
        self.bucket_options = dict(bucket_options or {})
        self._local = _LocalBackend()
        self._http = _HttpBackend(http_timeout_s)

    @classmethod
    def from_config(cls, cfg: Config) -> Storage:
        """Options for every bucket the config names; the output bucket's options win."""
        buckets: dict[str, S3Options] = {}
        for url in _metadata_urls(cfg):
            if url.startswith("s3://"):
                buckets[split_s3_url(url)[0]] = cfg.source.s3
        buckets[cfg.source.images.bucket] = cfg.source.images.s3
        for url in (
            cfg.output.url,
            cfg.output.cache_url,
            cfg.train.model_dir,
            cfg.export.dir,
            cfg.serve.model,
        ):
            if url and url.startswith("s3://"):
                buckets[split_s3_url(url)[0]] = cfg.output.s3
        return cls(s3=cfg.output.s3, bucket_options=buckets)

    def _backend(self, url: str) -> Any:
        scheme = _scheme(url)
        if scheme == "file":
            return self._local
        if scheme == "s3":
            bucket, _ = split_s3_url(url)
            return _S3Backend(self.bucket_options.get(bucket, self.s3_default))
        return self._http

    def _writable(self, url: str) -> Any:
        b = self._backend(url)
        if isinstance(b, _HttpBackend):
            raise ReadOnlyLocation(url)
        return b

    # reads
    def read_bytes(self, url: str) -> bytes:
        """Whole object."""
        return self._backend(url).read_bytes(url)

    def read_range(self, url: str, start: int, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` (to the end when ``end`` is None)."""
        return self._backend(url).read_bytes(url, start, end)

    def read_text(self, url: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(url).decode(encoding)

    def read_json(self, url: str) -> Any:
        data = self.read_bytes(url)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"not valid JSON ({exc.msg} at line {exc.lineno})", url) from exc

    def exists(self, url: str) -> bool:
        return self._backend(url).exists(url)

    def size(self, url: str) -> int:
        return self._backend(url).size(url)

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose URL starts with ``prefix`` (a folder or a partial name), sorted."""
        b = self._backend(prefix)
        if isinstance(b, _HttpBackend):
            raise StorageError("cannot list an http location", prefix, err=errno.EINVAL)
        return list(b.list(prefix))

    def download_file(self, url: str, dest: str | Path) -> Path:
        """Copy an object to a local file (atomically) and return its path."""
        dest = Path(dest)
        self._backend(url).download_file(url, dest)
        return dest

    def cached_local(self, url: str, cache_dir: str | Path) -> Path:
        """A local path holding ``url``: the file itself if local, else a copy made once in ``cache_dir``."""
        lp = local_path(url)
        if lp is not None:
            if not lp.is_file():
                raise ObjectNotFound(url)
            return lp
        p = urlparse(url)
        dest = Path(cache_dir) / p.scheme / p.netloc / p.path.lstrip("/")
        if dest.is_file():
            return dest
        return self.download_file(url, dest)

    # writes
    def write_bytes(self, url: str, data: bytes) -> None:
        """Write an object atomically (readers see the old object or the whole new one)."""
        b = self._writable(url)
        if isinstance(b, _S3Backend):
            b.write_bytes(url, data)
            return
        with b.writer(url) as fh:
            fh.write(data)

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode())

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    @contextlib.contextmanager
    def open_write(self, url: str) -> Iterator[IO[bytes]]:
        """Stream a large object: bytes go to a local temp file and are committed on clean exit.

        Nothing becomes visible at ``url`` if the block raises.
        """
        with self._writable(url).writer(url) as fh:
            yield fh

    def upload_file(self, local: str | Path, url: str) -> None:
        """Upload a local file (multipart above the threshold) atomically."""
        self._writable(url).upload_file(Path(local), url)

    def put_conditional(self, url: str, data: bytes, *, if_match: str | None = None) -> str | None:
        """S3 compare-and-swap: create only if absent (``if_match`` None) or replace only the version ``if_match``.

        Returns:
            The new ETag, or None when the precondition did not hold.

        Raises:
            StorageError: not an ``s3://`` URL (local files lock with ``flock`` instead), or the store failed.
        """
        b = self._writable(url)
        if not isinstance(b, _S3Backend):
            raise StorageError("conditional writes are only used on s3://", url)
        return b.put_conditional(url, data, if_match=if_match)

    def read_with_etag(self, url: str) -> tuple[bytes, str]:
        """An ``s3://`` object and its ETag (for :meth:`put_conditional`)."""
        b = self._backend(url)
        if not isinstance(b, _S3Backend):
            raise StorageError("ETags exist only on s3://", url)
        return b.read_with_etag(url)

    def delete(self, url: str) -> None:
        """Delete an object; a missing object is not an error."""
        self._writable(url).delete(url)


def _metadata_urls(cfg: Config) -> list[str]:
    s = cfg.source
    urls = [u for u in (s.class_descriptions, s.hierarchy, s.trainable_classes) if u]
    for sp in s.splits.values():
        urls.extend(u for u in (sp.boxes, sp.images, sp.image_labels) if u)
    return urls
