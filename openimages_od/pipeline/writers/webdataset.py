"""WebDataset shards: POSIX tar files with ``{image_id}.jpg`` and ``{image_id}.json`` per image.

Readable by the ``webdataset`` library (``wds.WebDataset(urls).decode()``), by
Ray Data (``ray.data.read_webdataset``) and by plain ``tar``. The tar is
deterministic: members in sample order (plan order, ImageID) and ``.jpg``
before ``.json`` within a sample; every header has mtime 0, uid/gid 0, empty
user and group names and mode 0644 (ustar format, so no pax records that
could carry a time).

The JSON annotation (keys sorted, compact) holds everything the TFRecord
example holds except the image bytes::

    {"image_id": "000a1249af2bc5f0", "source_id": "...", "width": 512, "height": 384,
     "format": "jpeg", "sha256": "<of the .jpg>",
     "boxes": [[xmin, ymin, xmax, ymax], ...],        # normalized to [0, 1], after rotation/resize
     "labels": [3, ...], "mids": ["/m/01g317", ...],   # label-map ids and Open Images MIDs, per box
     "group_of": [0, ...], "is_crowd": [0, ...],       # per box, 1/0
     "occluded": [1, ...], "truncated": [0, ...], "depiction": [-1, ...],   # 1, 0, -1 = unknown
     "image_labels": {"labels": [...], "mids": [...], "confidence": [...]}}  # only if the plan has any

Box coordinates are the float32 values the TFRecord holds, written exactly
(a float32 survives the JSON round trip), so both formats carry equal boxes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from openimages_od.errors import DataError
from openimages_od.pipeline.example import BytesF, Feature, FloatF, IntF, decode_example, encode_example
from openimages_od.pipeline.writers.base import Sample, ShardWriter

__all__ = ["WebDatasetShardWriter", "annotation", "example_from"]

_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")
# JSON key -> tf.Example key of the per-box integer attributes.
_PER_BOX_INTS = {
    "labels": "image/object/class/label",
    "group_of": "image/object/group_of",
    "is_crowd": "image/object/is_crowd",
    "occluded": "image/object/occluded",
    "truncated": "image/object/truncated",
    "depiction": "image/object/depiction",
}


def _text(f: Mapping[str, Feature], key: str) -> str:
    v = f.get(key)
    return bytes(v[0]).decode() if v else ""


def annotation(features: Mapping[str, Feature]) -> dict[str, Any]:
    """The JSON annotation of one decoded example (see the module docstring)."""
    f = features
    coords = [[float(v) for v in f.get(f"image/object/bbox/{k}", ())] for k in _BOX_KEYS]
    doc: dict[str, Any] = {
        "image_id": _text(f, "image/filename"),
        "source_id": _text(f, "image/source_id"),
        "width": int(f["image/width"][0]),
        "height": int(f["image/height"][0]),
        "format": _text(f, "image/format"),
        "sha256": _text(f, "image/key/sha256"),
        "boxes": [list(b) for b in zip(*coords)],
        "mids": [bytes(v).decode() for v in f.get("image/object/class/text", ())],
    }
    for name, key in _PER_BOX_INTS.items():
        doc[name] = [int(v) for v in f.get(key, ())]
    if "image/class/label" in f:
        doc["image_labels"] = {
            "labels": [int(v) for v in f["image/class/label"]],
            "mids": [bytes(v).decode() for v in f.get("image/class/text", ())],
            "confidence": [float(v) for v in f.get("image/class/confidence", ())],
        }
    return doc


def example_from(image: bytes, doc: Mapping[str, Any]) -> bytes:
    """The serialized tf.Example of a sample read back (the inverse of :func:`annotation`)."""
    boxes = doc.get("boxes") or []
    feats: dict[str, Feature] = {
        "image/encoded": BytesF([image]),
        "image/format": BytesF([doc["format"]]),
        "image/height": IntF([doc["height"]]),
        "image/width": IntF([doc["width"]]),
        "image/filename": BytesF([doc["image_id"]]),
        "image/source_id": BytesF([doc["source_id"]]),
        "image/key/sha256": BytesF([doc["sha256"]]),
        "image/object/class/text": BytesF(doc.get("mids") or []),
    }
    for i, k in enumerate(_BOX_KEYS):
        feats[f"image/object/bbox/{k}"] = FloatF(b[i] for b in boxes)
    for name, key in _PER_BOX_INTS.items():
        feats[key] = IntF(doc.get(name) or [])
    il = doc.get("image_labels")
    if il:
        feats["image/class/label"] = IntF(il["labels"])
        feats["image/class/text"] = BytesF(il["mids"])
        feats["image/class/confidence"] = FloatF(il["confidence"])
    return encode_example(feats)


def _member(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class WebDatasetShardWriter(ShardWriter):
    """Tar shards in the WebDataset layout: ``{image_id}.jpg`` + ``{image_id}.json`` per sample."""

    name = "webdataset"
    extension = "tar"

    def __init__(self) -> None:
        self._tar: tarfile.TarFile | None = None
        self._shard = ""

    def open(self, out: BinaryIO, shard: str) -> None:
        self._shard = shard
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, sample: Sample) -> None:
        if self._tar is None:
            raise RuntimeError("WebDatasetShardWriter.write before open")
        # WebDataset groups files by the name up to the first dot: an ImageID must have none.
        if not sample.image_id or "." in sample.image_id or "/" in sample.image_id:
            raise DataError(f"{self._shard}: image id {sample.image_id!r} cannot be a WebDataset key")
        f = decode_example(sample.example)
        image = bytes(f["image/encoded"][0])
        doc = json.dumps(annotation(f), sort_keys=True, separators=(",", ":")).encode()
        ext = _text(f, "image/format") or "jpeg"
        for suffix, payload in ((("jpg" if ext == "jpeg" else ext), image), ("json", doc)):
            self._tar.addfile(_member(f"{sample.image_id}.{suffix}", len(payload)), io.BytesIO(payload))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()  # end-of-archive blocks and padding; leaves the stream open
            self._tar = None

    @classmethod
    def read(cls, data: bytes, source: str) -> Iterator[Sample]:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                members = [(m.name, tar.extractfile(m)) for m in tar if m.isfile()]
                files = [(n, fh.read()) for n, fh in members if fh is not None]
        except tarfile.TarError as exc:
            raise DataError(f"{source}: not a readable tar file ({exc})") from exc
        by_key: dict[str, dict[str, bytes]] = {}
        for name, payload in files:
            key, _, suffix = name.partition(".")
            by_key.setdefault(key, {})[suffix] = payload
        for key, parts in by_key.items():
            if "json" not in parts:
                raise DataError(f"{source}: sample {key!r} has no .json annotation")
            try:
                doc = json.loads(parts["json"])
            except ValueError as exc:
                raise DataError(f"{source}: {key}.json is not valid JSON ({exc})") from exc
            image = next((v for k, v in parts.items() if k != "json"), None)
            if image is None:
                raise DataError(f"{source}: sample {key!r} has no image")
            yield Sample(key, example_from(image, doc))
