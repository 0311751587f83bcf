"""Drawing detections onto an image with Pillow (boxes, label and score)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from openimages_od.serving.model import Detection

__all__ = ["PALETTE", "color_for", "draw_detections"]

# Saturated colours that stay readable on photos; the web page uses the same list (static/app.js).
PALETTE: list[tuple[int, int, int]] = [
    (255, 0, 255),
    (255, 215, 0),
    (0, 255, 255),
    (255, 128, 0),
    (128, 255, 0),
    (255, 0, 128),
    (0, 128, 255),
    (255, 255, 255),
    (170, 0, 255),
    (0, 255, 128),
]


def color_for(class_id: int) -> tuple[int, int, int]:
    """The drawing colour of a class (stable across requests and the web page)."""
    return PALETTE[(int(class_id) - 1) % len(PALETTE)]


@lru_cache(maxsize=16)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(
    data: bytes, detections: Sequence[Detection], fmt: str = "jpeg", quality: int = 90
) -> bytes:
    """Decode ``data``, draw ``detections`` and encode as JPEG or PNG.

    Args:
        data: the encoded input image (already size-checked).
        detections: detections in pixel coordinates of that image.
        fmt: ``"jpeg"`` or ``"png"``.
        quality: JPEG quality.

    Returns:
        The encoded annotated image.
    """
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    draw = ImageDraw.Draw(img)
    line = max(2, round(min(w, h) / 150))
    font = _font(max(10, round(min(w, h) / 40)))
    # Lowest score first so the best detection ends up on top.
    for d in sorted(detections, key=lambda d: d.score):
        color = color_for(d.class_id)
        x0, y0 = round(d.box["x0"]), round(d.box["y0"])
        x1, y1 = max(x0, round(d.box["x1"]) - 1), max(y0, round(d.box["y1"]) - 1)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        text = f"{d.label} {d.score:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0] + 4, tb[3] - tb[1] + 4
        ty = y0 - th if y0 - th >= 0 else y0 + line
        tx = min(x0, max(0, w - tw))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + 2 - tb[0], ty + 2 - tb[1]), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=3)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
