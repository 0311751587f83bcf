"""The shard writer interface and its registry.

A shard writer turns the records of one shard into the bytes of one file; it
knows a file format and nothing else. Everything around it stays in
:mod:`openimages_od.pipeline.shard` (the commit protocol: data first, then the
ledger, the stats last; retries; resume) and :mod:`openimages_od.layout` (where
the file goes: ``tfrecords/{split}/{name}.{extension}``).

A writer is used once per shard::

    w = WriterClass()
    w.open(out, "train-00003-of-00010")   # out: a binary stream
    for sample in samples:                # plan order (ImageID)
        w.write(sample)
    w.close()                             # writes any trailer; does not close ``out``

and must give the same bytes for the same samples (shards are deterministic:
no timestamps, no host names, no dict-order accidents).

``shards.format`` names a registered writer (:data:`WRITERS`) or a class by
its import path, ``"package.module:Class"``, so a project (or a test) can
plug one in without editing this package. Adding a writer to the package is
one new module here plus one line in :data:`WRITERS`.
"""

from __future__ import annotations

import abc
import importlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

__all__ = [
    "WRITERS",
    "Sample",
    "ShardWriter",
    "UnknownWriter",
    "resolve_writer",
    "write_shard",
    "writer_names",
]


@dataclass(frozen=True)
class Sample:
    """One image's record as the pipeline hands it to a writer.

    Attributes:
        image_id: the Open Images ImageID (unique within a shard; a safe file-name stem).
        example: the serialized ``tf.train.Example`` with the shard contract's keys
            (:func:`openimages_od.pipeline.example.detection_features`): the encoded JPEG,
            its size and sha256, the boxes after rotation and resizing, class ids and MIDs,
            box attributes and image-level labels. It is the pipeline's one lossless,
            deterministic record; a writer for another format decodes what it needs.
    """

    image_id: str
    example: bytes


class ShardWriter(abc.ABC):
    """Writes the samples of one shard to one file (see the module docstring for the protocol).

    Class attributes:
        name: the ``shards.format`` value it is registered under.
        extension: the shard file's extension, without the dot (``"tfrecord"``, ``"tar"``).
    """

    name: ClassVar[str]
    extension: ClassVar[str]

    @abc.abstractmethod
    def open(self, out: BinaryIO, shard: str) -> None:
        """Start a shard.

        Args:
            out: where the file's bytes go (the caller commits them).
            shard: the shard's name, for error messages.
        """

    @abc.abstractmethod
    def write(self, sample: Sample) -> None:
        """Append one sample (samples arrive in plan order)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the file (trailers, padding); ``out`` stays open."""

    @classmethod
    @abc.abstractmethod
    def read(cls, data: bytes, source: str) -> Iterator[Sample]:
        """The samples of a file this writer wrote, in order (``--retry-failed`` reuses them byte for byte).

        Args:
            data: the whole file.
            source: its URL, for error messages.

        Raises:
            DataError: the bytes are not a valid file of this format (naming ``source``).
        """


# name -> "module:Class", imported on first use so a format's dependencies load only when chosen.
WRITERS: dict[str, str] = {
    "tfrecord": "openimages_od.pipeline.writers.tfrecord:TFRecordShardWriter",
    "webdataset": "openimages_od.pipeline.writers.webdataset:WebDatasetShardWriter",
}


class UnknownWriter(ValueError):
    """``shards.format`` names no registered writer and no importable :class:`ShardWriter` class."""


def writer_names() -> list[str]:
    """The registered ``shards.format`` names."""
    return sorted(WRITERS)


def _import(path: str, spec: str) -> type[ShardWriter]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownWriter(
            f"shards.format {spec!r}: expected one of {writer_names()} or an import path 'package.module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownWriter(f"shards.format {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise UnknownWriter(f"shards.format {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, ShardWriter)):
        raise UnknownWriter(f"shards.format {spec!r}: {path} is not a ShardWriter subclass")
    if _is_abstract(obj):
        raise UnknownWriter(f"shards.format {spec!r}: {path} leaves abstract methods unimplemented")
    ext = getattr(obj, "extension", "")
    if not isinstance(ext, str) or not ext or "/" in ext or ext.startswith("."):
        raise UnknownWriter(
            f"shards.format {spec!r}: {path}.extension must be a file extension without the dot"
        )
    return obj


def _is_abstract(cls: type) -> bool:
    """Whether ``cls`` still has abstract methods (it could not be instantiated)."""
    return bool(getattr(cls, "__abstractmethods__", ()))


def resolve_writer(spec: str) -> type[ShardWriter]:
    """The writer class ``shards.format`` names.

    Args:
        spec: a registered name (``"tfrecord"``, ``"webdataset"``) or ``"package.module:Class"``.

    Raises:
        UnknownWriter: neither a registered name nor an importable ShardWriter subclass
            (the message lists the registered names).
    """
    if spec in WRITERS:
        return _import(WRITERS[spec], spec)
    if ":" not in spec:
        raise UnknownWriter(
            f"shards.format {spec!r} is not a known shard writer; expected one of {writer_names()} "
            f"or an import path 'package.module:Class' of a ShardWriter"
        )
    return _import(spec, spec)


def write_shard(writer: type[ShardWriter], shard: str, samples: Iterable[Sample]) -> bytes:
    """The bytes of one shard file: ``samples`` written in order by a fresh ``writer``."""
    buf = io.BytesIO()
    w = writer()
    w.open(buf, shard)
    for s in samples:
        w.write(s)
    w.close()
    return buf.getvalue()
