"""Local files (paths and ``file://`` URLs)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from openimages_od.storage.base import AccessDenied, ObjectInfo, ObjectNotFound, StorageError, local_path

__all__ = ["LocalBackend"]


class LocalBackend:
    """Local files: atomic writes through a temporary file in the same folder, fsynced, renamed."""

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

    @contextlib.contextmanager
    def writer(self, url: str, durable: bool = True) -> Iterator[IO[bytes]]:
        path = local_path(url)
        assert path is not None

        def temp_file() -> tuple[int, str]:
            return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)

        try:
            try:  # the folder is there for all but a folder's first object: no mkdir + stat per write
                fd, tmp = temp_file()
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = temp_file()
        except PermissionError as exc:
            raise AccessDenied(url) from exc
        except OSError as exc:
            raise StorageError(f"cannot create ({exc.strerror or exc})", url) from exc
        ok = False
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                if durable:
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
