"""Read committed shards back as samples: image bytes, size and boxes, one shard at a time.

The shards are the source of truth for an export: what train and evaluate read
is exactly what :func:`openimages_od.dataset.dataset_shards` lists, so an export
holds the same images and boxes the model saw. Records are decoded with the
project's TensorFlow-free TFRecord reader and ``tf.Example`` decoder; a whole
shard is held in memory while it is converted (the same bound prepare and
evaluate have), never more than one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from openimages_od.errors import DataError
from openimages_od.pipeline.example import decode_example
from openimages_od.pipeline.tfrecord import iter_records
from openimages_od.storage import Storage

__all__ = ["Box", "Sample", "check_tfrecord", "iter_shard", "sample_from_example"]

# A POSIX tar header carries "ustar" at byte 257: WebDataset shards are tar files.
_TAR_MAGIC_OFFSET = 257


@dataclass(frozen=True)
class Box:
    """One object box, coordinates normalised to [0, 1] as the shards store them.

    Attributes:
        xmin, ymin, xmax, ymax: corners (float32 values of the shard, as floats).
        label: label-map id.
        mid: the Open Images MID (``image/object/class/text``).
        group_of: 1 for a group-of box, else 0.
        occluded, truncated, depiction: Open Images' 1 / 0, or -1 when unknown.
    """

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: int
    mid: str
    group_of: int
    occluded: int
    truncated: int
    depiction: int


@dataclass(frozen=True)
class Sample:
    """One image of a shard with its boxes."""

    image_id: str
    source_id: str
    encoded: bytes
    image_format: str
    width: int
    height: int
    boxes: tuple[Box, ...]

    @property
    def extension(self) -> str:
        """File extension for :attr:`encoded` (prepare writes JPEG)."""
        return "jpg" if self.image_format in ("jpeg", "jpg", "") else self.image_format


def check_tfrecord(data: bytes, url: str) -> None:
    """Refuse shards that are not TFRecord files with a message that says what they are.

    Raises:
        DataError: ``url`` is a tar (WebDataset) shard.
    """
    if url.endswith(".tar") or data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        raise DataError(
            f"{url}: a tar (WebDataset) shard; export-dataset reads TFRecord shards only "
            f"(prepare the output with shards.format=tfrecord to export it)"
        )


def _ints(f: dict[str, Any], key: str, n: int, default: int, where: str) -> list[int]:
    vals = [int(v) for v in f.get(key, ())]
    if not vals:
        return [default] * n
    if len(vals) != n:
        raise DataError(f"{where}: {key} has {len(vals)} values for {n} boxes")
    return vals


def sample_from_example(f: dict[str, Any], where: str) -> Sample:
    """A :class:`Sample` from a decoded ``tf.Example`` (``decode_example`` output).

    Raises:
        DataError: a required key is missing or the box lists disagree in length.
    """
    try:
        image_id = bytes(f["image/filename"][0]).decode()
        encoded = bytes(f["image/encoded"][0])
        width = int(f["image/width"][0])
        height = int(f["image/height"][0])
    except (KeyError, IndexError):
        raise DataError(
            f"{where}: record lacks image/filename, image/encoded, image/width or image/height"
        ) from None
    coords = [
        [float(v) for v in f.get(f"image/object/bbox/{k}", ())] for k in ("xmin", "ymin", "xmax", "ymax")
    ]
    labels = [int(v) for v in f.get("image/object/class/label", ())]
    n = len(labels)
    if any(len(c) != n for c in coords):
        raise DataError(
            f"{where} (image {image_id}): {n} labels but {[len(c) for c in coords]} xmin/ymin/xmax/ymax values"
        )
    mids = [bytes(v).decode() for v in f.get("image/object/class/text", ())] or [""] * n
    if len(mids) != n:
        raise DataError(f"{where} (image {image_id}): {len(mids)} class texts for {n} boxes")
    group_of = _ints(f, "image/object/group_of", n, 0, where)
    occluded = _ints(f, "image/object/occluded", n, -1, where)
    truncated = _ints(f, "image/object/truncated", n, -1, where)
    depiction = _ints(f, "image/object/depiction", n, -1, where)
    boxes = tuple(
        Box(
            coords[0][i],
            coords[1][i],
            coords[2][i],
            coords[3][i],
            labels[i],
            mids[i],
            group_of[i],
            occluded[i],
            truncated[i],
            depiction[i],
        )
        for i in range(n)
    )
    fmt = f.get("image/format", (b"jpeg",))
    sid = f.get("image/source_id", ())
    return Sample(
        image_id=image_id,
        source_id=bytes(sid[0]).decode() if sid else image_id,
        encoded=encoded,
        image_format=bytes(fmt[0]).decode().lower() if fmt else "jpeg",
        width=width,
        height=height,
        boxes=boxes,
    )


def iter_shard(storage: Storage, url: str) -> Iterator[Sample]:
    """Every sample of one committed TFRecord shard, in record order.

    Raises:
        DataError: the shard is a tar (WebDataset) file, is corrupt (CRC, truncation) or a record is
            malformed; the message names the shard URL and the record.
    """
    data = storage.read_bytes(url)
    check_tfrecord(data, url)
    for n, rec in enumerate(iter_records(data, source=url)):
        where = f"{url} record {n}"
        try:
            f = decode_example(rec)
        except (ValueError, IndexError) as exc:
            raise DataError(f"{where}: not a tf.Example ({exc})") from None
        yield sample_from_example(f, where)
