"""Mirror a local working folder to a remote ``model_dir`` (``s3://``) and back.

TF cannot write ``s3://`` here, so training (and the evaluator's summaries)
happen in a local folder that :class:`DirSync` copies up after each checkpoint
and down when a job starts (to resume). Rules that keep the remote copy
consistent for a reader at any moment:

* files are uploaded before the index that names them: TF's ``checkpoint``
  file goes last, so a remote reader never sees an index pointing at a
  checkpoint whose data has not arrived;
* a file is re-uploaded when its size or mtime changed since the last sync;
* a remote file is deleted only if this syncer uploaded (or downloaded) it and
  it has since disappeared locally (old checkpoints dropped by
  ``max_to_keep``); files written by others (e.g. ``eval/``) are never touched.

This module does not import TensorFlow.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openimages_od.config import join_url
from openimages_od.storage import Storage, local_path

__all__ = ["DirSync", "is_remote"]

log = logging.getLogger(__name__)

# Written last on upload: the files that name other files.
_INDEX_NAMES = ("checkpoint",)


def is_remote(url: str) -> bool:
    """True when ``url`` is not on the local filesystem (TF cannot write it directly)."""
    return local_path(url) is None


class DirSync:
    """Two-way mirror between ``local_dir`` and ``remote_url``.

    Args:
        storage: the project's storage layer.
        local_dir: the local working folder.
        remote_url: the remote folder URL (``s3://...``).
        exclude: top-level sub-folders (relative names) this syncer ignores.
        threads: parallel transfers.
    """

    def __init__(
        self,
        storage: Storage,
        local_dir: str | Path,
        remote_url: str,
        exclude: Iterable[str] = (),
        threads: int = 8,
    ) -> None:
        self.storage = storage
        self.local_dir = Path(local_dir)
        self.remote_url = remote_url.rstrip("/")
        self.exclude = tuple(e.strip("/") for e in exclude)
        self.threads = threads
        self._synced: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) at last transfer
        self._lock = threading.Lock()

    def _excluded(self, rel: str) -> bool:
        return any(rel == e or rel.startswith(e + "/") for e in self.exclude)

    def _local_files(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        if not self.local_dir.is_dir():
            return out
        for dirpath, _, files in os.walk(self.local_dir):
            for f in files:
                if f.endswith(".tmp") or f.endswith(".part") or ".tempstate" in f:
                    continue  # in-progress writes (TF and our storage layer)
                full = Path(dirpath) / f
                rel = full.relative_to(self.local_dir).as_posix()
                if self._excluded(rel):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> int:
        """Download every remote file not present locally with the same size; returns files fetched."""
        prefix = self.remote_url + "/"
        try:
            objs = self.storage.list(prefix)
        except FileNotFoundError:
            return 0
        todo = []
        for o in objs:
            rel = o.url[len(prefix) :]
            if not rel or self._excluded(rel):
                continue
            dest = self.local_dir / rel
            if dest.is_file() and dest.stat().st_size == o.size and rel not in _INDEX_NAMES:
                st = dest.stat()
                self._synced[rel] = (st.st_size, st.st_mtime_ns)
                continue
            todo.append((o.url, rel, dest))

        def one(item: tuple[str, str, Path]) -> None:
            url, rel, dest = item
            self.storage.download_file(url, dest)
            st = dest.stat()
            with self._lock:
                self._synced[rel] = (st.st_size, st.st_mtime_ns)

        self._run(one, todo)
        if todo:
            log.info("pulled %d files from %s", len(todo), self.remote_url)
        return len(todo)

    def push(self) -> int:
        """Upload new or changed files (indexes last) and delete remote copies of removed ones."""
        local = self._local_files()
        changed = [rel for rel, sig in local.items() if self._synced.get(rel) != sig]
        data = [r for r in changed if r.rsplit("/", 1)[-1] not in _INDEX_NAMES]
        index = [r for r in changed if r.rsplit("/", 1)[-1] in _INDEX_NAMES]

        def one(rel: str) -> None:
            sig = local[rel]
            self.storage.upload_file(self.local_dir / rel, join_url(self.remote_url, rel))
            with self._lock:
                self._synced[rel] = sig

        self._run(one, data)
        self._run(one, index)
        gone = [rel for rel in list(self._synced) if rel not in local]
        for rel in gone:
            self.storage.delete(join_url(self.remote_url, rel))
            del self._synced[rel]
        if changed or gone:
            log.info("pushed %d files (%d deleted) to %s", len(changed), len(gone), self.remote_url)
        return len(changed)

    def _run(self, fn, items: list) -> None:
        if not items:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(items)))) as pool:
            list(pool.map(fn, items))

    @staticmethod
    def local_work_dir(remote_url: str, base: Path | None = None) -> Path:
        """A stable local folder for a remote URL (so a restarted job on the same node reuses it)."""
        import hashlib
        import tempfile

        base = base or Path(tempfile.gettempdir())
        digest = hashlib.sha256(remote_url.encode()).hexdigest()[:16]
        return base / f"oiod-work-{os.getuid()}" / digest
