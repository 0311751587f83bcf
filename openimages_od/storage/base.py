"""Storage errors, the one retry helper and URL helpers shared by every backend."""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

__all__ = [
    "AccessDenied",
    "ObjectInfo",
    "ObjectNotFound",
    "ReadOnlyLocation",
    "StorageError",
    "TransientStorageError",
    "local_path",
    "retry_call",
    "scheme_of",
    "split_gs_url",
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
    """One listed object: its full URL and size in bytes."""

    url: str
    size: int


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise StorageError("not an s3://bucket/key URL", url, err=errno.EINVAL)
    return p.netloc, p.path.lstrip("/")


def split_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/key`` -> (bucket, key)."""
    p = urlparse(url)
    if p.scheme != "gs" or not p.netloc:
        raise StorageError("not a gs://bucket/key URL", url, err=errno.EINVAL)
    return p.netloc, p.path.lstrip("/")


def local_path(url: str) -> Path | None:
    """The filesystem path for a local URL, or None for remote URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url:
        return None
    return Path(url).absolute()


def scheme_of(url: str) -> str:
    """The backend a URL goes to: ``file``, ``s3``, ``gs``, ``http`` or ``https``."""
    if url.startswith("file://") or "://" not in url:
        return "file"
    s = urlparse(url).scheme.lower()
    if s in ("s3", "gs", "http", "https"):
        return s
    raise StorageError(
        f"unsupported URL scheme {s!r} (use a path, file://, s3://, gs:// or http(s)://)",
        url,
        err=errno.EINVAL,
    )
