"""Geometry: Rotation, EXIF orientation, resize; boxes follow the pixels.

Conventions:

* Box coordinates are relative (0..1) to the pixel grid as stored in the
  source file. Any transform applied to the pixels (the plan's ``Rotation`` or
  the EXIF orientation) is applied to the boxes too, so the written boxes match
  the written pixels.
* ``Rotation`` is counter-clockwise degrees (0/90/180/270; null = unknown).
* Which wins (``image.exif``):

  - ``rotation_wins`` (default): a non-null ``Rotation`` is applied and EXIF is
    ignored; a null ``Rotation`` falls back to the EXIF orientation.
  - ``exif_wins``: an EXIF orientation other than 1 is applied and ``Rotation``
    ignored; otherwise ``Rotation``.
  - ``ignore``: only ``Rotation``; EXIF is never applied.

* Resize keeps the aspect ratio so the long side is at most ``max_side`` and
  never upscales. Output size: ``round(side * max_side / long_side)``.
* The output JPEG carries no EXIF, so every reader (``tf.io.decode_jpeg``
  ignores EXIF) sees the same upright pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from openimages_od.pipeline.verify import Rejected, check_jpeg_scan, decode_jpeg_strict, full_decode

__all__ = [
    "Op",
    "RenderedImage",
    "choose_ops",
    "ops_for_exif",
    "ops_for_rotation",
    "render",
    "target_size",
    "transform_box",
    "transform_boxes",
    "transform_point",
]

Op = Image.Transpose

# Pillow's transpose ops as maps of a relative point (x, y) (y down).
_POINT = {
    Op.FLIP_LEFT_RIGHT: lambda x, y: (1.0 - x, y),
    Op.FLIP_TOP_BOTTOM: lambda x, y: (x, 1.0 - y),
    Op.ROTATE_90: lambda x, y: (y, 1.0 - x),  # counter-clockwise
    Op.ROTATE_180: lambda x, y: (1.0 - x, 1.0 - y),
    Op.ROTATE_270: lambda x, y: (1.0 - y, x),
    Op.TRANSPOSE: lambda x, y: (y, x),
    Op.TRANSVERSE: lambda x, y: (1.0 - y, 1.0 - x),
}
_SWAPS = {Op.ROTATE_90, Op.ROTATE_270, Op.TRANSPOSE, Op.TRANSVERSE}

# EXIF orientation tag (0x0112) -> the op that makes the image upright (as ImageOps.exif_transpose).
_EXIF_OPS = {
    2: Op.FLIP_LEFT_RIGHT,
    3: Op.ROTATE_180,
    4: Op.FLIP_TOP_BOTTOM,
    5: Op.TRANSPOSE,
    6: Op.ROTATE_270,
    7: Op.TRANSVERSE,
    8: Op.ROTATE_90,
}
_ROTATION_OPS = {90: Op.ROTATE_90, 180: Op.ROTATE_180, 270: Op.ROTATE_270}
_RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


def ops_for_rotation(rotation: int | None) -> list[Op]:
    """Ops for a counter-clockwise ``Rotation`` (null/0 = none).

    Raises:
        Rejected: ``bad_rotation`` for angles other than multiples of 90.
    """
    if rotation is None:
        return []
    r = int(rotation) % 360
    if r == 0:
        return []
    if r not in _ROTATION_OPS:
        raise Rejected("bad_rotation", f"Rotation {rotation} is not a multiple of 90")
    return [_ROTATION_OPS[r]]


def ops_for_exif(orientation: int | None) -> list[Op]:
    """Ops for an EXIF orientation value (1 or unknown = none)."""
    op = _EXIF_OPS.get(int(orientation)) if orientation else None
    return [op] if op is not None else []


def choose_ops(rotation: int | None, exif_orientation: int | None, mode: str = "rotation_wins") -> list[Op]:
    """The transforms to apply, per the ``image.exif`` policy (see module docstring)."""
    if mode == "ignore":
        return ops_for_rotation(rotation)
    if mode == "exif_wins":
        exif = ops_for_exif(exif_orientation)
        return exif if exif else ops_for_rotation(rotation)
    if rotation is not None:
        return ops_for_rotation(rotation)
    return ops_for_exif(exif_orientation)


def transform_point(x: float, y: float, ops: Sequence[Op]) -> tuple[float, float]:
    for op in ops:
        x, y = _POINT[op](x, y)
    return x, y


def transform_box(
    box: tuple[float, float, float, float], ops: Sequence[Op]
) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) relative -> the same box after ``ops``."""
    xmin, xmax, ymin, ymax = box
    if not ops:
        return box
    x1, y1 = transform_point(xmin, ymin, ops)
    x2, y2 = transform_point(xmax, ymax, ops)
    return min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)


def transform_boxes(
    boxes: Sequence[tuple[float, float, float, float]], ops: Sequence[Op]
) -> list[tuple[float, float, float, float]]:
    return [transform_box(b, ops) for b in boxes]


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after an aspect-preserving downscale to ``max_side`` (never upscales)."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    scale = max_side / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class RenderedImage:
    """The bytes written to the shard and how they were made."""

    data: bytes
    width: int
    height: int
    ops: list[Op]
    kept_original: bool
    source_size: tuple[int, int]


def exif_orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:
        return None
    return int(value) if isinstance(value, int) else None


def render(
    img: Image.Image,
    data: bytes,
    *,
    rotation: int | None,
    max_side: int,
    quality: int,
    exif_mode: str = "rotation_wins",
    keep_original_if_fits: bool = True,
    resample: str = "box",
) -> RenderedImage:
    """Decode (fully), orient, resize and encode one verified-header image.

    JPEG fast path: libjpeg decodes straight at 1/2, 1/4 or 1/8 scale when the
    target allows it (the scale Pillow's ``draft`` would pick; YCbCr and grey
    JPEGs are decoded by libjpeg-turbo with warnings as errors, see
    :func:`~openimages_od.pipeline.verify.decode_jpeg_strict`; for an exact
    power-of-two ratio no resize is left to do), and ``resample`` does the rest: BOX by default, an area
    average like BILINEAR for a downscale of at most 2x (what is left after the
    draft) at about 2/3 of its cost; LANCZOS is the slowest. When the source is a JPEG that already fits, is upright
    and has no EXIF orientation to honour, its bytes are kept as they are
    (verified by :func:`~openimages_od.pipeline.verify.check_jpeg_scan`, an
    entropy decode at 1/8 scale with libjpeg's warnings as errors, which
    catches truncation and headers that claim more pixels than the data holds).

    Args:
        img: from :func:`openimages_od.pipeline.verify.open_image` (not yet loaded).
        data: the source bytes (kept as-is when allowed).
        rotation: plan ``Rotation`` (CCW degrees) or None.
        max_side: long-side limit.
        quality: JPEG quality for re-encoding.
        exif_mode: ``image.exif`` policy.
        keep_original_if_fits: allow keeping the source bytes.
        resample: ``box``, ``bilinear`` or ``lanczos`` (``image.resample``).

    Raises:
        Rejected: ``truncated``, ``corrupt``, ``bad_rotation``; any other error
            raised while decoding or converting these bytes is ``corrupt`` too,
            so one hostile file costs one image, never its shard.
    """
    try:
        return _render(
            img,
            data,
            rotation=rotation,
            max_side=max_side,
            quality=quality,
            exif_mode=exif_mode,
            keep_original_if_fits=keep_original_if_fits,
            resample=resample,
        )
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}"[:200]) from None


def _render(
    img: Image.Image,
    data: bytes,
    *,
    rotation: int | None,
    max_side: int,
    quality: int,
    exif_mode: str,
    keep_original_if_fits: bool,
    resample: str,
) -> RenderedImage:
    src_w, src_h = img.size
    orientation = exif_orientation(img) if exif_mode != "ignore" else None
    ops = choose_ops(rotation, orientation, exif_mode)
    tw, th = target_size(src_w, src_h, max_side)
    is_jpeg = img.format == "JPEG"
    if (
        keep_original_if_fits
        and is_jpeg
        and not ops
        and (tw, th) == (src_w, src_h)
        and orientation in (None, 1)
        and img.mode in ("RGB", "L")
    ):
        check_jpeg_scan(data)  # the kept bytes are what TF decodes: their scan must be complete
        return RenderedImage(data, src_w, src_h, [], True, (src_w, src_h))
    if is_jpeg and img.mode in ("RGB", "L"):
        # One libjpeg-turbo decode at the draft scale, with the scan checked (warnings as errors).
        img = decode_jpeg_strict(
            data, img.mode, (src_w, src_h), (tw, th) if (tw, th) != (src_w, src_h) else None
        )
    else:
        if is_jpeg and (tw, th) != (src_w, src_h):
            img.draft("RGB" if img.mode not in ("L", "RGB") else img.mode, (tw, th))
        full_decode(img, data)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (tw, th):
        img = img.resize((tw, th), _RESAMPLE[resample], reducing_gap=2.0)
    for op in ops:
        img = img.transpose(op)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return RenderedImage(buf.getvalue(), img.size[0], img.size[1], ops, False, (src_w, src_h))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])  # transparent pixels become white, not black
        return bg
    return img.convert("RGB")
