"""Google Cloud Storage (``gs://``) through the google-cloud-storage client.

Anonymous access reaches public buckets; ``endpoint_url`` points the client at
a fake server (tests, air-gapped mirrors). The client's own retries are turned
off (``retry=None``): transient errors are retried in :func:`retry_call`, the
one place every backend retries in. Uploads are single requests or resumable
uploads that become visible only when complete, so writes are atomic.
"""

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
    split_gs_url,
)
from openimages_od.storage.options import GcsOptions

T = TypeVar("T")

__all__ = ["GcsBackend"]

_INSTALL_HINT = "gs:// URLs need google-cloud-storage (pip install google-cloud-storage)"
_CLIENTS: dict[tuple[int, str], Any] = {}
_LOCK = threading.Lock()


def _anonymous(cls: Any) -> Any:
    # google-auth's AnonymousCredentials is untyped; calling it through Any keeps strict mypy quiet.
    return cls()


def _make_client(opts: GcsOptions) -> Any:
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise StorageError(_INSTALL_HINT, "gs://", err=0) from exc
    client_options = {"api_endpoint": opts.endpoint_url} if opts.endpoint_url else None
    if opts.anonymous:
        return gcs.Client(
            credentials=_anonymous(AnonymousCredentials),
            project=opts.project or "anonymous",
            client_options=client_options,
        )
    try:
        return gcs.Client(project=opts.project, client_options=client_options)
    except Exception as exc:  # google.auth's DefaultCredentialsError, or no project
        if opts.anonymous is False:
            raise StorageError(f"no Google Cloud credentials ({exc})", "gs://") from exc
        # anonymous: null means "credentials when found": public buckets need none.
        return gcs.Client(
            credentials=_anonymous(AnonymousCredentials),
            project=opts.project or "anonymous",
            client_options=client_options,
        )


def _client(opts: GcsOptions) -> Any:
    key = (os.getpid(), opts.model_dump_json())
    client = _CLIENTS.get(key)
    if client is None:
        with _LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = _make_client(opts)
                _CLIENTS[key] = client
    return client


def _translate(exc: Exception, url: str) -> StorageError:
    """A backend error as a :class:`StorageError` subclass (transient ones are retried)."""
    from google.api_core import exceptions as ge

    if isinstance(exc, ge.NotFound):
        return ObjectNotFound(url)
    if isinstance(exc, (ge.Forbidden, ge.Unauthorized)):
        return AccessDenied(url, f"access denied ({exc.code})")
    if isinstance(exc, (ge.TooManyRequests, ge.ServerError, ge.RetryError, ge.DeadlineExceeded)):
        return TransientStorageError(url, f"GCS error {getattr(exc, 'code', '') or type(exc).__name__}")
    if isinstance(exc, ge.GoogleAPICallError):
        return StorageError(f"GCS error {exc.code}: {exc.message}"[:300], url)
    try:  # requests is google-cloud-storage's transport
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return TransientStorageError(url, f"cannot reach the GCS endpoint ({type(exc).__name__})")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientStorageError(url, f"connection failed ({exc})")
    return StorageError(f"GCS operation failed ({type(exc).__name__}: {exc})"[:300], url)


class GcsBackend:
    """``gs://`` objects: the same operations as the S3 backend, same error classes."""

    def __init__(self, opts: GcsOptions) -> None:
        self.opts = opts

    def _call(self, url: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                raise _translate(exc, url) from exc

        return retry_call(once, attempts=self.opts.max_attempts)

    def _blob(self, url: str) -> Any:
        bucket, key = split_gs_url(url)
        return _client(self.opts).bucket(bucket).blob(key)

    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        if start is not None and end is not None and end <= start:
            return b""
        kw: dict[str, Any] = {"retry": None, "timeout": self.opts.timeout_s}
        if start is not None:
            kw["start"] = start
            if end is not None:
                kw["end"] = end - 1  # the client's end is inclusive
        return self._call(url, lambda: bytes(self._blob(url).download_as_bytes(**kw)))

    def upload_file(self, local: Path, url: str) -> None:
        self._call(
            url,
            lambda: self._blob(url).upload_from_filename(
                str(local), retry=None, timeout=self.opts.timeout_s, checksum="crc32c"
            ),
        )

    def write_bytes(self, url: str, data: bytes) -> None:
        self._call(
            url,
            lambda: self._blob(url).upload_from_string(data, retry=None, timeout=self.opts.timeout_s),
        )

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
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            self._call(
                url,
                lambda: self._blob(url).download_to_filename(
                    str(tmp), retry=None, timeout=self.opts.timeout_s
                ),
            )
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _get_blob(self, url: str) -> Any:
        bucket, key = split_gs_url(url)
        blob = self._call(
            url,
            lambda: _client(self.opts).bucket(bucket).get_blob(key, retry=None, timeout=self.opts.timeout_s),
        )
        if blob is None:
            raise ObjectNotFound(url)
        return blob

    def exists(self, url: str) -> bool:
        try:
            self._get_blob(url)
            return True
        except ObjectNotFound:
            return False

    def size(self, url: str) -> int:
        return int(self._get_blob(url).size)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_gs_url(prefix)

        def pages() -> list[ObjectInfo]:
            blobs = _client(self.opts).list_blobs(bucket, prefix=key, retry=None, timeout=self.opts.timeout_s)
            return [ObjectInfo(f"gs://{bucket}/{b.name}", int(b.size or 0)) for b in blobs]

        yield from sorted(self._call(prefix, pages), key=lambda o: o.url)

    def delete(self, url: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            self._call(url, lambda: self._blob(url).delete(retry=None, timeout=self.opts.timeout_s))
