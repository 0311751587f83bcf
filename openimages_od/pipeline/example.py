"""A TensorFlow-free ``tf.train.Example`` encoder (and a small decoder).

The wire format is protobuf: ``Example{features: Features{feature: map<string,
Feature>}}`` with ``Feature`` a oneof of ``BytesList`` (1), ``FloatList`` (2,
packed floats) and ``Int64List`` (3, packed varints). Keys are written sorted,
so the same features always give the same bytes (shards are deterministic).

Writing protobuf by hand keeps TensorFlow out of the download workers and is
faster than ``tf.train.Example.SerializeToString`` for our small messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["BytesF", "Feature", "FloatF", "IntF", "decode_example", "detection_features", "encode_example"]


class BytesF(tuple):
    """A ``BytesList`` feature (str values are UTF-8 encoded)."""


class FloatF(tuple):
    """A ``FloatList`` feature (stored as float32)."""


class IntF(tuple):
    """An ``Int64List`` feature."""


Feature = BytesF | FloatF | IntF


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf does
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _feature_bytes(f: Feature) -> bytes:
    if isinstance(f, BytesF):
        inner = b"".join(_ld(1, v.encode() if isinstance(v, str) else bytes(v)) for v in f)
        return _ld(1, inner)
    if isinstance(f, FloatF):
        packed = struct.pack(f"<{len(f)}f", *f) if f else b""
        return _ld(2, _ld(1, packed) if f else b"")
    if isinstance(f, IntF):
        packed = b"".join(_varint(int(v)) for v in f)
        return _ld(3, _ld(1, packed) if f else b"")
    raise TypeError(f"feature must be BytesF, FloatF or IntF, got {type(f).__name__}")


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """Serialize a ``tf.train.Example``.

    Args:
        features: key -> :class:`BytesF` / :class:`FloatF` / :class:`IntF`.

    Returns:
        The serialized message; keys in sorted order, so the output is deterministic.
    """
    entries = b"".join(
        _ld(1, _ld(1, key.encode()) + _ld(2, _feature_bytes(features[key]))) for key in sorted(features)
    )
    return _ld(1, entries)


# --------------------------------------------------------------------------- decoding


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, int | bytes]]:
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
            yield field, wire, val
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            yield field, wire, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _decode_feature(buf: bytes) -> Feature:
    for field, _, payload in _fields(buf):
        assert isinstance(payload, bytes)
        if field == 1:
            return BytesF(v for f, _, v in _fields(payload) if f == 1)
        if field == 2:
            vals: list[float] = []
            for f, wire, v in _fields(payload):
                if f == 1 and wire in (2, 5) and isinstance(v, bytes):  # packed, or one fixed32
                    vals.extend(struct.unpack(f"<{len(v) // 4}f", v) if wire == 2 else struct.unpack("<f", v))
            return FloatF(vals)
        if field == 3:
            ints: list[int] = []
            for f, wire, v in _fields(payload):
                if f != 1:
                    continue
                if wire == 2 and isinstance(v, bytes):  # packed
                    p = 0
                    while p < len(v):
                        x, p = _read_varint(v, p)
                        ints.append(x - (1 << 64) if x >= 1 << 63 else x)
                elif isinstance(v, int):  # one varint (wire 0)
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            return IntF(ints)
    return BytesF()


def decode_example(data: bytes, keys: Sequence[str] | None = None) -> dict[str, Feature]:
    """Parse a serialized ``tf.train.Example`` (used to reuse records and in tests).

    Args:
        data: serialized message.
        keys: only decode these keys (None = all).
    """
    out: dict[str, Feature] = {}
    for f, _, features in _fields(data):
        if f != 1:
            continue
        for f2, _, entry in _fields(features):  # type: ignore[arg-type]
            if f2 != 1:
                continue
            key = val = None
            for f3, _, v in _fields(entry):  # type: ignore[arg-type]
                if f3 == 1:
                    key = bytes(v).decode()
                elif f3 == 2:
                    val = v
            if key is not None and (keys is None or key in keys):
                out[key] = _decode_feature(val or b"")  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- Open Images -> OD keys


def _attr(v: object) -> int:
    return -1 if v is None else int(v)  # type: ignore[call-overload]


def detection_features(
    row: dict,
    encoded: bytes,
    width: int,
    height: int,
    boxes: list[tuple[float, float, float, float]],
    sha256_hex: str,
) -> dict[str, Feature]:
    """The Object Detection / Model Garden ``tf.Example`` keys for one plan row.

    Args:
        row: plan row (:data:`openimages_od.openimages.planio.PLAN_SCHEMA`).
        encoded: JPEG bytes.
        width: encoded image width.
        height: encoded image height.
        boxes: (xmin, xmax, ymin, ymax) per ``row["boxes"]`` entry, after rotation.
        sha256_hex: digest of ``encoded``.

    ``group_of`` and ``is_crowd`` are 1 for group-of boxes and 0 otherwise
    (Open Images' -1, unknown, is written 0): readers such as TF OD API's and
    Model Garden's decoders cast these keys to bool, and -1 would read as True.
    The other attribute keys (``occluded``, ``truncated``, ``depiction``) keep
    Open Images' values (1, 0, -1 = unknown).
    """
    src = row.get("boxes") or []
    clip = lambda v: min(1.0, max(0.0, float(v)))  # noqa: E731
    feats: dict[str, Feature] = {
        "image/encoded": BytesF([encoded]),
        "image/format": BytesF([b"jpeg"]),
        "image/height": IntF([height]),
        "image/width": IntF([width]),
        "image/filename": BytesF([row["image_id"]]),
        "image/source_id": BytesF([str(row["source_id"])]),
        "image/key/sha256": BytesF([sha256_hex]),
        "image/object/bbox/xmin": FloatF(clip(b[0]) for b in boxes),
        "image/object/bbox/xmax": FloatF(clip(b[1]) for b in boxes),
        "image/object/bbox/ymin": FloatF(clip(b[2]) for b in boxes),
        "image/object/bbox/ymax": FloatF(clip(b[3]) for b in boxes),
        "image/object/class/label": IntF(int(b["label_id"]) for b in src),
        "image/object/class/text": BytesF(b["mid"] for b in src),
        "image/object/group_of": IntF(1 if b.get("is_group_of") == 1 else 0 for b in src),
        "image/object/is_crowd": IntF(1 if b.get("is_group_of") == 1 else 0 for b in src),
        "image/object/occluded": IntF(_attr(b.get("is_occluded")) for b in src),
        "image/object/truncated": IntF(_attr(b.get("is_truncated")) for b in src),
        "image/object/depiction": IntF(_attr(b.get("is_depiction")) for b in src),
    }
    labels = row.get("image_labels") or []
    if labels:
        feats["image/class/label"] = IntF(int(x["label_id"]) for x in labels)
        feats["image/class/text"] = BytesF(x["mid"] for x in labels)
        feats["image/class/confidence"] = FloatF(
            float(x["confidence"] if x["confidence"] is not None else 1.0) for x in labels
        )
    return feats
