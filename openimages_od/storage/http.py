"""Read-only ``http(s)://`` locations."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from openimages_od.storage.base import (
    AccessDenied,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    retry_call,
)

__all__ = ["HttpBackend"]


class HttpBackend:
    """Read-only ``http(s)://`` (metadata downloads) with urllib, retried by :func:`retry_call`."""

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
                data = bytes(resp.read())
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
