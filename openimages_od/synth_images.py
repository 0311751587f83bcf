"""Drawing the generated photos of :mod:`openimages_od.synth`.

Each photo is a textured background with one to three shapes (one shape per class) and, at
``group_of_rate``, a cluster of small shapes under one group-of box; it is stored rotated
clockwise by its ``Rotation`` (which, applied counter-clockwise, undoes it), with boxes relative
to the stored image. Everything is drawn from the caller's random generators, so a seed gives
byte-identical photos.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SynthClass", "SynthImage", "make_image", "rotate_box_cw"]


@dataclass(frozen=True)
class SynthClass:
    """A class to draw: its real MID and display name, the shape standing for it and its colour."""

    mid: str
    name: str
    shape: str  # circle | triangle | rect
    color: tuple[int, int, int]


@dataclass
class SynthImage:
    """One generated photo as stored (possibly rotated) with its boxes and verified labels."""

    image_id: str
    split: str
    rotation: int
    jpeg: bytes
    boxes: list[dict]  # relative to the stored image
    width: int  # stored
    height: int
    labels: dict[str, int] = field(default_factory=dict)  # verified image-level labels: mid -> 0/1


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.integers(60, 200, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (gx / max(w, 1) * rng.uniform(-60, 60) + gy / max(h, 1) * rng.uniform(-60, 60))[..., None]
    # Low-frequency blobs plus fine noise: compresses like a photo, not like a flat fill.
    small = rng.normal(0, 28, size=(max(2, h // 24), max(2, w // 24), 3))
    blobs = (
        np.asarray(
            Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize(
                (w, h), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        - 128
    )
    noise = rng.normal(0, 10, size=(h, w, 3))
    return np.clip(base + grad + blobs + noise, 0, 255).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw, cls: SynthClass, box: tuple[float, float, float, float], rng: random.Random
) -> None:
    x0, y0, x1, y1 = box
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in cls.color)
    outline = tuple(max(0, c - 60) for c in jitter)
    if cls.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=jitter, outline=outline, width=2)
    elif cls.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=jitter, outline=outline)
    else:
        draw.rectangle([x0, y0, x1, y1], fill=jitter, outline=outline, width=3)
        draw.line([((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1)], fill=outline, width=2)


def rotate_box_cw(box: dict, k: int) -> dict:
    """Box (relative) of an upright image stored rotated ``k`` quarter-turns clockwise."""
    x0, x1, y0, y1 = box["XMin"], box["XMax"], box["YMin"], box["YMax"]
    for _ in range(k % 4):
        # one clockwise quarter-turn: (x, y) -> (1 - y, x)
        x0, x1, y0, y1 = 1 - y1, 1 - y0, x0, x1
    return {**box, "XMin": x0, "XMax": x1, "YMin": y0, "YMax": y1}


def _pick(rng: random.Random, classes: tuple[SynthClass, ...], weights: list[float] | None) -> SynthClass:
    # Without weights, exactly the draw the generator always made (datasets stay byte-identical per seed).
    return rng.choice(classes) if weights is None else rng.choices(classes, weights)[0]


def make_image(
    rng: random.Random,
    nrng: np.random.Generator,
    classes: tuple[SynthClass, ...],
    image_id: str,
    split: str,
    min_side: int,
    max_side: int,
    rotation: int,
    group_of_rate: float,
    weights: list[float] | None = None,
) -> SynthImage:
    w = rng.randint(min_side, max_side)
    h = rng.randint(min_side, max_side)
    img = Image.fromarray(_texture(nrng, w, h))
    draw = ImageDraw.Draw(img)
    boxes: list[dict] = []
    present: set[str] = set()
    n_obj = rng.randint(1, 3)
    occupied: list[tuple[float, float, float, float]] = []
    for _ in range(n_obj):
        cls = _pick(rng, classes, weights)
        for _attempt in range(20):
            bw = rng.uniform(0.18, 0.45) * w
            bh = bw * rng.uniform(0.8, 1.25) if cls.shape != "rect" else rng.uniform(0.2, 0.5) * h
            bh = min(bh, 0.6 * h)
            x0 = rng.uniform(0, w - bw)
            y0 = rng.uniform(0, h - bh)
            cand = (x0, y0, x0 + bw, y0 + bh)
            if all(cand[2] < o[0] or cand[0] > o[2] or cand[3] < o[1] or cand[1] > o[3] for o in occupied):
                break
        else:
            continue
        occupied.append(cand)
        _draw_shape(draw, cls, cand, rng)
        boxes.append(_box(cls, cand, w, h, group_of=0))
        present.add(cls.mid)
    if rng.random() < group_of_rate:
        # A cluster of small objects of one class, annotated by one group-of box.
        cls = _pick(rng, classes, weights)
        gx0, gy0 = rng.uniform(0, 0.6) * w, rng.uniform(0, 0.6) * h
        gw, gh = 0.35 * w, 0.35 * h
        if all(gx0 + gw < o[0] or gx0 > o[2] or gy0 + gh < o[1] or gy0 > o[3] for o in occupied):
            s = min(gw, gh) / 3
            for i in range(3):
                for j in range(2):
                    _draw_shape(
                        draw,
                        cls,
                        (gx0 + i * s, gy0 + j * s * 1.3, gx0 + i * s + s * 0.9, gy0 + j * s * 1.3 + s * 0.9),
                        rng,
                    )
            boxes.append(_box(cls, (gx0, gy0, gx0 + 3 * s, gy0 + 1.3 * s + s * 0.9), w, h, group_of=1))
            present.add(cls.mid)
    # Store the image rotated clockwise by `rotation`; Rotation (CCW) undoes it.
    k = (rotation // 90) % 4
    stored = img.rotate(-90 * k, expand=True) if k else img
    boxes = [rotate_box_cw(b, k) for b in boxes]
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=rng.randint(85, 92))
    labels = {c.mid: (1 if c.mid in present else 0) for c in classes}
    return SynthImage(image_id, split, rotation, buf.getvalue(), boxes, stored.width, stored.height, labels)


def _box(cls: SynthClass, xyxy: tuple[float, float, float, float], w: int, h: int, group_of: int) -> dict:
    x0, y0, x1, y1 = xyxy
    return {
        "LabelName": cls.mid,
        "XMin": max(0.0, x0 / w),
        "XMax": min(1.0, x1 / w),
        "YMin": max(0.0, y0 / h),
        "YMax": min(1.0, y1 / h),
        "IsGroupOf": group_of,
        "IsOccluded": 0,
        "IsTruncated": 0,
        "IsDepiction": 0,
        "IsInside": 0,
    }
