"""Shard writers: one file format per module, chosen by ``shards.format`` (see :mod:`.base`)."""

from openimages_od.pipeline.writers.base import (
    WRITERS,
    Sample,
    ShardWriter,
    UnknownWriter,
    resolve_writer,
    write_shard,
    writer_names,
)

__all__ = [
    "WRITERS",
    "Sample",
    "ShardWriter",
    "UnknownWriter",
    "resolve_writer",
    "write_shard",
    "writer_names",
]
