"""TFRecord framing without TensorFlow.

Each record is ``uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)``, little endian, with the CRC32C mask TensorFlow
uses (``((crc >> 15) | (crc << 17)) + 0xa282ead8``). ``google-crc32c`` gives a
hardware-accelerated CRC.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import google_crc32c

from openimages_od.errors import DataError

__all__ = ["encode_records", "frame_record", "iter_records", "masked_crc32c"]

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(record: bytes) -> bytes:
    """One framed record."""
    header = struct.pack("<Q", len(record))
    return b"".join(
        (header, struct.pack("<I", masked_crc32c(header)), record, struct.pack("<I", masked_crc32c(record)))
    )


def encode_records(records: Iterable[bytes]) -> bytes:
    """A whole TFRecord file (uncompressed) as bytes."""
    return b"".join(frame_record(r) for r in records)


def iter_records(data: bytes, source: str = "tfrecord", verify: bool = True) -> Iterator[bytes]:
    """Records of a TFRecord file held in memory.

    Raises:
        DataError: on a truncated file or a CRC mismatch (naming ``source`` and the offset).
    """
    pos, end = 0, len(data)
    while pos < end:
        if pos + 12 > end:
            raise DataError(f"{source}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if verify and hcrc != masked_crc32c(header):
            raise DataError(f"{source}: bad length CRC at byte {pos}")
        start = pos + 12
        stop = start + length
        if stop + 4 > end:
            raise DataError(f"{source}: truncated record at byte {pos}")
        record = data[start:stop]
        if verify and struct.unpack("<I", data[stop : stop + 4])[0] != masked_crc32c(record):
            raise DataError(f"{source}: bad data CRC at byte {pos}")
        yield record
        pos = stop + 4
