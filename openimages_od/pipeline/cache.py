"""The image cache: every image is fetched from its source once, whatever the plans that follow.

One object per image and per byte-changing image setting
(:func:`openimages_od.layout.image_digest`), at
``{cache root}/images-{digest}/{id[:2]}/{image_id}.oiodimg``, holding the
verified, upright, resized JPEG exactly as it goes into a record, plus what
the record needs besides the plan row: size, the geometry ops applied (to
transform the boxes), the source it came from. A re-plan or a re-shard builds
every record it has seen before from here, CPU only, byte for byte the same
record as a fresh fetch would give; the ledger marks those ``from_cache``.

Images that failed are cached too (without bytes), so a re-plan does not ask a
dead URL again; ``prepare --retry-failed`` ignores those entries and fetches
again. An entry is used only when the plan row still has the same
``Rotation`` and ``OriginalMD5`` (a new release that changed an image is a miss).

Object format: ``OIODIMG1\\n`` + one JSON header line + ``\\n`` + the JPEG bytes. The
header holds the bytes' sha256 (``sha256``, the same digest the record carries as
``image/key/sha256``), checked on every read.

Entries are written atomically but not fsynced (``durable=False``): an fsync per image
cost 0.15-0.6 CPU-ms on 2 cores, 3-8% of prepare's CPU per image, for an object that
can always be fetched again. After a power loss an entry may be missing, empty or
short; the magic, the header and the sha256 make any such entry a miss (fetched
again), never a wrong record. Entries written before the digest was stored (no
``sha256`` key) were fsynced, and are read as before.

A shard reads and writes the cache in batches (:meth:`ImageCache.get_many`,
:meth:`ImageCache.put_many`): one hand-off to a thread per batch instead of two
per image. Measured on 2 cores (no Ray, 2,000 photos), the per-image hand-offs
cost about 0.5 CPU-ms per image beside the 0.25 ms of the writes themselves. A
batch runs in one thread on local disk (the syscalls are cheap there) and on a
small pool for S3 and GCS (whose requests wait on the network).
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from openimages_od.storage import ObjectNotFound, Storage, local_path

__all__ = ["CacheEntry", "ImageCache", "decode_entry", "encode_entry"]

_MAGIC = b"OIODIMG1\n"
_REMOTE_THREADS = 8  # concurrent requests of one batch to S3 or GCS


@dataclass
class CacheEntry:
    """One image as prepare made it (or why it could not)."""

    image_id: str
    status: str  # ok | failed
    rotation: int | None = None
    original_md5: str | None = None
    source: str | None = None
    url: str | None = None
    bytes: int = 0  # bytes fetched from the source
    width: int = 0
    height: int = 0
    kept_original: bool = False
    ops: list[int] = field(default_factory=list)  # PIL Image.Transpose values, in order
    error: str | None = None
    attempts: list[str] = field(default_factory=list)
    data: builtins.bytes = b""  # builtins: the field `bytes` above shadows the type in this class
    # Hex digest of `data` (ok entries), derived from it, so not part of equality; encode_entry
    # computes it when None.
    sha256: str | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def matches(self, row: dict[str, Any]) -> bool:
        """Still the image the plan row describes."""
        return self.rotation == row.get("rotation") and self.original_md5 == row.get("original_md5")


def encode_entry(e: CacheEntry) -> bytes:
    head = {k: v for k, v in asdict(e).items() if k != "data"}
    if e.ok and head["sha256"] is None:
        head["sha256"] = hashlib.sha256(e.data).hexdigest()
    return _MAGIC + json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n" + e.data


def decode_entry(raw: bytes, where: str = "") -> CacheEntry:
    """The entry in ``raw``.

    Raises:
        ValueError: not an entry, or a damaged one (its bytes do not match its sha256).
    """
    if not raw.startswith(_MAGIC):
        raise ValueError(f"{where}: not an oiod image cache entry")
    nl = raw.index(b"\n", len(_MAGIC))
    head = json.loads(raw[len(_MAGIC) : nl])
    known = set(CacheEntry.__dataclass_fields__)
    data = raw[nl + 1 :]
    digest = head.get("sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{where}: damaged oiod image cache entry (its bytes do not match its sha256)")
    if head.get("status") == "ok" and digest is None:  # written before the digest was stored
        head["sha256"] = hashlib.sha256(data).hexdigest()
    return CacheEntry(**{k: v for k, v in head.items() if k in known}, data=data)


class ImageCache:
    """Reads and writes cache entries for one image-settings digest.

    Args:
        storage: the storage layer.
        layout: the output layout (knows the cache root).
        settings_digest: :func:`openimages_od.layout.image_digest` of the image settings.
    """

    def __init__(self, storage: Storage, layout: Any, settings_digest: str) -> None:
        self.storage = storage
        self.layout = layout
        self.digest = settings_digest
        self._pool: ThreadPoolExecutor | None = None  # for batches on remote storage, made on first use

    def url(self, image_id: str) -> str:
        return self.layout.image_cache(self.digest, image_id)

    def get(self, image_id: str) -> CacheEntry | None:
        """The entry, or None when the image was never prepared with these settings (or it is unreadable)."""
        url = self.url(image_id)
        try:
            raw = self.storage.read_bytes(url)
        except ObjectNotFound:
            return None
        try:
            return decode_entry(raw, url)
        except (ValueError, TypeError):  # a damaged entry is a miss, never a failure
            return None

    def put(self, entry: CacheEntry) -> None:
        # Not fsynced: the entry's sha256 catches what a power loss can leave (module doc).
        self.storage.write_bytes(self.url(entry.image_id), encode_entry(entry), durable=False)

    def get_many(self, image_ids: Sequence[str]) -> list[CacheEntry | None]:
        """:meth:`get` of each id, in order (one call, so one thread hand-off, per batch)."""
        return self._each(self.get, image_ids)

    def put_many(self, entries: Sequence[CacheEntry]) -> None:
        """:meth:`put` of each entry.

        Raises:
            StorageError: the first write that failed (the caller's shard fails and is retried).
        """
        self._each(self.put, entries)

    def _each(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) < 2 or local_path(self.layout.image_cache_dir(self.digest)) is not None:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_REMOTE_THREADS, thread_name_prefix="oiod-cache")
        futures = [self._pool.submit(fn, x) for x in items]
        wait(futures)  # none still running when an error is raised
        return [f.result() for f in futures]

    def present(self) -> set[str]:
        """Image ids with an entry (one listing; for ``oiod status``)."""
        prefix = self.layout.image_cache_dir(self.digest) + "/"
        try:
            objs = self.storage.list(prefix)
        except FileNotFoundError:
            return set()
        return {o.url.rsplit("/", 1)[-1].removesuffix(".oiodimg") for o in objs if o.url.endswith(".oiodimg")}
