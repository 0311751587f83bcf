"""TFRecord shards: one framed ``tf.train.Example`` per image (what train and evaluate read)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from openimages_od.errors import DataError
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.tfrecord import frame_record, iter_records
from openimages_od.pipeline.writers.base import Sample, ShardWriter

__all__ = ["TFRecordShardWriter"]


class TFRecordShardWriter(ShardWriter):
    """Uncompressed TFRecord framing (:mod:`openimages_od.pipeline.tfrecord`) of each sample's example."""

    name = "tfrecord"
    extension = "tfrecord"

    def __init__(self) -> None:
        self._out: BinaryIO | None = None

    def open(self, out: BinaryIO, shard: str) -> None:
        self._out = out

    def write(self, sample: Sample) -> None:
        if self._out is None:
            raise RuntimeError("TFRecordShardWriter.write before open")
        self._out.write(frame_record(sample.example))

    def close(self) -> None:
        self._out = None

    @classmethod
    def read(cls, data: bytes, source: str) -> Iterator[Sample]:
        for rec in iter_records(data, source):
            fn = decode_example(rec, keys=("image/filename",)).get("image/filename")
            if not fn:
                raise DataError(f"{source}: a record has no image/filename")
            yield Sample(bytes(fn[0]).decode(), rec)
