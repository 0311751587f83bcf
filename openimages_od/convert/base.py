"""The interface a dataset export format implements, and the output it writes through.

A format is one module with one :class:`FormatWriter` subclass plus one line in
:data:`openimages_od.convert.FORMATS`. The driver (:mod:`.export`) owns the
commit protocol: it invalidates the previous export, clears the folders the
format names in :attr:`FormatWriter.owned`, streams every split's samples
through :meth:`FormatWriter.add`, and writes ``export.json`` last.
"""

from __future__ import annotations

import abc
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, ClassVar

from openimages_od.convert.reader import Sample
from openimages_od.openimages.labelmap import LabelClass
from openimages_od.storage import Storage

__all__ = ["ExportTarget", "FormatWriter", "fmt_float"]


def fmt_float(v: float) -> str:
    """A coordinate as text: 10 significant digits, well past the float32 precision of the shards."""
    return f"{v:.10g}"


class ExportTarget:
    """Where an export goes: a root URL, the storage layer and a bounded pool for object writes.

    Every object is written atomically by :class:`~openimages_od.storage.Storage`. Image writes run
    on ``threads`` threads (S3 PUTs are latency-bound) with at most ``2 * threads`` in flight, so
    memory stays bounded by one shard whatever the dataset size.

    Args:
        root: export root URL (``file://``, local path or ``s3://``), no trailing slash.
        storage: the storage layer.
        threads: parallel object writes.
    """

    def __init__(self, root: str, storage: Storage, threads: int = 8) -> None:
        self.root = root.rstrip("/")
        self.storage = storage
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="oiod-export")
        self._pending: list[Future[None]] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="oiod-export-"))

    def url(self, rel: str) -> str:
        """The URL of ``rel`` (a ``/``-separated path) under the root."""
        return f"{self.root}/{rel.lstrip('/')}"

    def put(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` in the background (errors surface at the next :meth:`wait`)."""
        if len(self._pending) >= 2 * self.threads:
            self._drain(len(self._pending) // 2)
        self._pending.append(self._pool.submit(self.storage.write_bytes, self.url(rel), data))

    def _drain(self, n: int) -> None:
        done, self._pending = self._pending[:n], self._pending[n:]
        for fut in done:
            fut.result()

    def wait(self) -> None:
        """Block until every background write is committed; re-raise the first failure."""
        self._drain(len(self._pending))

    def write_now(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` before returning."""
        self.storage.write_bytes(self.url(rel), data)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """Stream one large object to ``rel``; nothing is visible there unless the block completes."""
        with self.storage.open_write(self.url(rel)) as fh:
            yield fh

    def spool(self, name: str) -> Path:
        """A local scratch file (for parts of a document assembled at the end of a split)."""
        return self._tmp / name

    def clear(self, rels: tuple[str, ...]) -> int:
        """Delete every object under the folders (``x/``) or files ``rels``; returns how many."""
        urls: list[str] = []
        for rel in rels:
            if rel.endswith("/"):
                with contextlib.suppress(FileNotFoundError):
                    urls.extend(o.url for o in self.storage.list(self.url(rel)))
            elif self.storage.exists(self.url(rel)):
                urls.append(self.url(rel))
        list(self._pool.map(self.storage.delete, urls))
        return len(urls)

    def close(self) -> None:
        """Wait for the pool to stop and remove the scratch folder (after a failure too)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._tmp, ignore_errors=True)


class FormatWriter(abc.ABC):
    """One export format. The driver calls, in order::

        begin_split(split) ; add(sample) ... ; end_split(split)   for each split
        finish(splits)

    Args:
        target: where to write.
        classes: the label map's classes, in id order.
    """

    #: The name used on the command line (``--format``).
    name: ClassVar[str]
    #: Folders (ending in ``/``) and files this format writes under the export root; a rerun
    #: deletes them before writing, so nothing of an earlier export survives into a new one.
    owned: ClassVar[tuple[str, ...]]

    def __init__(self, target: ExportTarget, classes: list[LabelClass]) -> None:
        self.target = target
        self.classes = classes
        self.by_id = {c.id: c for c in classes}

    @abc.abstractmethod
    def begin_split(self, split: str) -> None:
        """Start a split."""

    @abc.abstractmethod
    def add(self, sample: Sample) -> None:
        """Write one image and its annotations (images through :meth:`ExportTarget.put`)."""

    @abc.abstractmethod
    def end_split(self, split: str) -> list[str]:
        """Finish a split; returns the split's index files (relative paths) for the manifest."""

    def finish(self, splits: list[str]) -> list[str]:
        """Write dataset-level files after the last split; returns their relative paths."""
        return []

    def describe(self) -> dict[str, Any]:
        """Format-specific facts recorded in ``export.json``."""
        return {}
