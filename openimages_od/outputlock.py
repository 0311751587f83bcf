"""One writer at a time under ``output.url``: the lock ``plan`` and ``prepare`` hold.

Two protocols, one per kind of storage, both released by the holder's death:

* ``file://`` (local disk, NFS): an exclusive ``fcntl.flock`` on ``{output}/.oiod.lock``.
  The kernel drops it when the process dies, so a killed run never blocks the next one.
* ``s3://``: a lease object ``{output}/.oiod.lock`` created with a conditional PUT
  (``If-None-Match: *``) and renewed every ``ttl/3`` by a heartbeat thread with
  ``If-Match: <etag>`` (compare-and-swap, so two writers can never both renew). A lease
  that has not been renewed for ``ttl`` seconds, or whose holder is a dead process on
  this host, is taken over with the same compare-and-swap. A holder that fails to renew
  marks itself lost, and the stages check :meth:`OutputLock.check` before committing.

A second ``plan``/``prepare`` on the same output fails at once with an error naming the
holder (exit 1) instead of interleaving its writes. The lock is re-entrant within a
process (``prepare`` plans first when there is no plan).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from openimages_od.errors import OiodError
from openimages_od.storage import ObjectNotFound, Storage, local_path

__all__ = ["LockHeld", "OutputLock", "output_lock"]

log = logging.getLogger(__name__)

_HELD: dict[str, OutputLock] = {}
_HELD_GUARD = threading.Lock()


class LockHeld(OiodError):
    """Another run holds the output lock."""

    exit_code = 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock on one output root (see the module docstring).

    Args:
        storage: the storage layer.
        url: the lock object's URL (:attr:`openimages_od.layout.Layout.lock`).
        ttl_s: lease length on S3.
        what: the command taking it (shown to a run that finds it held).
    """

    def __init__(self, storage: Storage, url: str, ttl_s: float = 120.0, what: str = "prepare") -> None:
        self.storage = storage
        self.url = url
        self.ttl_s = ttl_s
        self.what = what
        self.token = uuid.uuid4().hex
        self.lost = False
        self._fh: Any = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "what": self.what,
                "renewed_at": now,
                "expires_at": now + self.ttl_s,
            }
        ).encode()

    @staticmethod
    def _describe(doc: dict) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(doc.get("renewed_at", 0)))
        return (
            f"{doc.get('what', '?')} on {doc.get('host', '?')} (pid {doc.get('pid', '?')}, renewed {since})"
        )

    # -- local
    def _acquire_local(self) -> None:
        import fcntl

        path = local_path(self.url)
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = self._describe(json.loads(fh.read() or "{}"))
            except ValueError:
                holder = "another process"
            fh.close()
            raise LockHeld(
                f"{self.url} is held by {holder}: another plan/prepare is writing this output; "
                f"wait for it to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(self._doc().decode())
        fh.flush()
        self._fh = fh

    # -- s3
    def _acquire_s3(self) -> None:
        st = self.storage
        etag = st.put_conditional(self.url, self._doc())
        if etag is None:
            try:
                data, cur = st.read_with_etag(self.url)
                doc = json.loads(data or b"{}")
            except ObjectNotFound:  # released in between: try once more
                doc, cur = {}, None
            except ValueError:
                doc = {}
            if doc.get("token") == self.token:  # our own create, retried after a lost reply
                etag = cur
            elif cur is None:
                etag = st.put_conditional(self.url, self._doc())
            else:
                dead = doc.get("host") == socket.gethostname() and not _pid_alive(int(doc.get("pid", 0) or 0))
                if not dead and time.time() < float(doc.get("expires_at", 0)):
                    raise LockHeld(
                        f"{self.url} is held by {self._describe(doc)} until "
                        f"{time.strftime('%H:%M:%S', time.localtime(doc['expires_at']))}: another "
                        f"plan/prepare is writing this output; wait for it (a crashed holder's lease "
                        f"expires after output.lock_ttl_s={self.ttl_s:g}s)"
                    )
                if float(doc.get("expires_at", 0)) > 0:  # 0 = released, not abandoned
                    log.warning(
                        "taking over the output lock from %s (%s)",
                        self._describe(doc),
                        "holder is dead" if dead else "lease expired",
                    )
                etag = st.put_conditional(self.url, self._doc(), if_match=cur)
            if etag is None:
                raise LockHeld(f"{self.url}: another run took the output lock at the same moment; retry")
        self._etag = etag
        self._thread = threading.Thread(target=self._heartbeat, name="oiod-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                etag = self.storage.put_conditional(self.url, self._doc(), if_match=self._etag)
            except OSError as exc:  # a transient outage: the lease still has two thirds left
                log.warning("cannot renew the output lock %s (%s)", self.url, exc)
                continue
            if etag is None:
                self.lost = True
                log.error("lost the output lock %s to another run", self.url)
                return
            self._etag = etag

    # -- public
    def acquire(self) -> OutputLock:
        if local_path(self.url) is not None:
            self._acquire_local()
        else:
            self._acquire_s3()
        return self

    def check(self) -> None:
        """Raise if the lease was lost (another run took over): nothing more may be committed."""
        if self.lost:
            raise LockHeld(f"lost the output lock {self.url} to another run; stopping before committing more")

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            with contextlib.suppress(OSError):
                self._fh.truncate(0)  # an idle lock file is empty: the holder's details are gone with it
                self._fh.flush()
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._etag and not self.lost:
            # Release = an expired lease written with compare-and-swap (never a delete, which could
            # remove a lease another run took a moment before); the next run takes it over.
            with contextlib.suppress(OSError):
                expired = json.dumps({"token": self.token, "what": self.what, "expires_at": 0}).encode()
                self.storage.put_conditional(self.url, expired, if_match=self._etag)


@contextlib.contextmanager
def output_lock(
    storage: Storage, url: str, ttl_s: float = 120.0, what: str = "prepare"
) -> Iterator[OutputLock]:
    """Hold the output lock for the block (re-entrant within the process)."""
    with _HELD_GUARD:
        held = _HELD.get(url)
    if held is not None:
        yield held
        return
    lock = OutputLock(storage, url, ttl_s, what).acquire()
    with _HELD_GUARD:
        _HELD[url] = lock
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(url, None)
        lock.release()
