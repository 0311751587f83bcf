"""A small dataset in the real Open Images V7 file layout, generated.

Real MIDs, names and the real box hierarchy (bundled in ``openimages_od/data``)
for a handful of classes; photos are generated: simple shapes (one shape per
class) on textured backgrounds, some stored rotated with the ``Rotation``
column set, some group-of clusters. Used by ``oiod demo``, the tests and the
benchmarks, so every stage runs its real code on data shaped like the real
thing.

Rotation convention (the same as the pipeline's): the CSV boxes are relative
to the image *as stored*; applying ``Rotation`` degrees counter-clockwise to
both the stored image and its boxes gives the upright image the objects were
drawn on.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np

from openimages_od.synth_images import SynthClass, SynthImage, make_image, rotate_box_cw

__all__ = [
    "DEMO_CLASSES",
    "FILES",
    "SynthClass",
    "SynthDataset",
    "SynthImage",
    "bundled_metadata",
    "generate_dataset",
    "upright_boxes",
]


DEMO_CLASSES: tuple[SynthClass, ...] = (
    SynthClass("/m/018xm", "Ball", "circle", (235, 120, 20)),
    SynthClass("/m/01mqdt", "Traffic sign", "triangle", (210, 20, 30)),
    SynthClass("/m/0d4v4", "Window", "rect", (30, 90, 220)),
)

MetadataKind = Literal["boxes", "images", "image_labels"]


class ReleaseFiles(TypedDict):
    """File names of one release: shared files, and one per split for each metadata kind."""

    classes: str
    hierarchy: str
    boxes: dict[str, str]
    images: dict[str, str]
    image_labels: dict[str, str]


# File names as the V6/V7 releases publish them.
FILES: ReleaseFiles = {
    "classes": "oidv7-class-descriptions-boxable.csv",
    "hierarchy": "bbox_labels_600_hierarchy.json",
    "boxes": {
        "train": "oidv6-train-annotations-bbox.csv",
        "validation": "validation-annotations-bbox.csv",
        "test": "test-annotations-bbox.csv",
    },
    "images": {
        "train": "train-images-boxable-with-rotation.csv",
        "validation": "validation-images-with-rotation.csv",
        "test": "test-images-with-rotation.csv",
    },
    "image_labels": {
        "train": "oidv7-train-annotations-human-imagelabels-boxable.csv",
        "validation": "validation-annotations-human-imagelabels-boxable.csv",
        "test": "test-annotations-human-imagelabels-boxable.csv",
    },
}

BOX_HEADER_V6 = [
    "ImageID",
    "Source",
    "LabelName",
    "Confidence",
    "XMin",
    "XMax",
    "YMin",
    "YMax",
    "IsOccluded",
    "IsTruncated",
    "IsGroupOf",
    "IsDepiction",
    "IsInside",
    "XClick1X",
    "XClick2X",
    "XClick3X",
    "XClick4X",
    "XClick1Y",
    "XClick2Y",
    "XClick3Y",
    "XClick4Y",
]
IMAGE_HEADER = [
    "ImageID",
    "Subset",
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "OriginalSize",
    "OriginalMD5",
    "Thumbnail300KURL",
    "Rotation",
]


def bundled_metadata() -> tuple[Path, Path]:
    """Paths of the bundled real class descriptions (no header, 601 classes) and hierarchy JSON."""
    base = resources.files("openimages_od") / "data"
    return Path(str(base / "class-descriptions-boxable.csv")), Path(
        str(base / "bbox_labels_600_hierarchy.json")
    )


@dataclass
class SynthDataset:
    """What :func:`generate_dataset` wrote."""

    root: Path
    classes: tuple[SynthClass, ...]
    images: list[SynthImage]
    bucket_dir: Path  # {split}/{image_id}.jpg, like the public bucket

    def metadata(self, split: str, kind: MetadataKind) -> Path:
        return self.root / FILES[kind][split]

    def split_images(self, split: str) -> list[SynthImage]:
        return [im for im in self.images if im.split == split]

    def source_config(self, splits: list[str] | None = None) -> dict:
        """A ``source`` config section pointing at the generated files."""
        splits = splits or sorted({im.split for im in self.images})
        return {
            "version": "v7",
            "class_descriptions": str(self.root / FILES["classes"]),
            "hierarchy": str(self.root / FILES["hierarchy"]),
            "splits": {
                s: {
                    "boxes": str(self.metadata(s, "boxes")),
                    "images": str(self.metadata(s, "images")),
                    "image_labels": str(self.metadata(s, "image_labels")),
                }
                for s in splits
            },
        }


def generate_dataset(
    root: str | Path,
    num_images: int = 120,
    *,
    splits: dict[str, float] | None = None,
    classes: tuple[SynthClass, ...] = DEMO_CLASSES,
    base_url: str = "http://127.0.0.1:8000",
    min_side: int = 256,
    max_side: int = 512,
    rotation_rate: float = 0.15,
    group_of_rate: float = 0.1,
    seed: int = 0,
    clean: bool = True,
    class_weights: dict[str, float] | None = None,
) -> SynthDataset:
    """Write a dataset in the Open Images V7 layout under ``root``.

    Args:
        root: output folder (metadata CSVs at the top, ``bucket/{split}/{image_id}.jpg`` beside).
        num_images: total images, divided across ``splits`` by fraction.
        splits: split name -> fraction (default 80% train, 20% validation).
        classes: the classes to draw (real MIDs).
        base_url: prefix for OriginalURL (``{base}/original/{split}/{id}.jpg``) and
            Thumbnail300KURL (``{base}/thumb/{split}/{id}.jpg``).
        min_side, max_side: generated photo size range (pixels).
        rotation_rate: fraction of images stored rotated with ``Rotation`` set.
        group_of_rate: fraction of images with a group-of cluster.
        seed: everything is deterministic given the seed.
        clean: remove ``root`` first.
        class_weights: relative frequency of each class (by MID or name) when drawing objects, for a
            long-tailed dataset (e.g. ``{"Window": 1, "Ball": 20, "Traffic sign": 20}``: Window objects
            20x rarer); None = uniform. Classes not named get weight 1.

    Returns:
        The :class:`SynthDataset` (images with their bytes and stored-frame boxes).
    """
    root = Path(root)
    if clean and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = splits or {"train": 0.8, "validation": 0.2}
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    weights = None
    if class_weights is not None:
        unknown = set(class_weights) - {c.mid for c in classes} - {c.name for c in classes}
        if unknown:
            raise ValueError(f"class_weights names unknown classes {sorted(unknown)}")
        weights = [float(class_weights.get(c.mid, class_weights.get(c.name, 1.0))) for c in classes]
    base_url = base_url.rstrip("/")

    names_path, hierarchy_path = bundled_metadata()
    with open(names_path, newline="") as fh:
        all_classes = [(r[0], r[1]) for r in csv.reader(fh) if r]
    with open(root / FILES["classes"], "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["LabelName", "DisplayName"])
        w.writerows(all_classes)
    shutil.copyfile(hierarchy_path, root / FILES["hierarchy"])

    counts: dict[str, int] = {}
    remaining = num_images
    items = list(splits.items())
    for i, (name, frac) in enumerate(items):
        counts[name] = remaining if i == len(items) - 1 else max(1, round(num_images * frac))
        remaining -= counts[name]

    images: list[SynthImage] = []
    seen: set[str] = set()
    for split, n in counts.items():
        for _ in range(n):
            while True:
                image_id = f"{rng.getrandbits(64):016x}"
                if image_id not in seen:
                    seen.add(image_id)
                    break
            rotation = rng.choice([90, 180, 270]) if rng.random() < rotation_rate else 0
            images.append(
                make_image(
                    rng, nrng, classes, image_id, split, min_side, max_side, rotation, group_of_rate, weights
                )
            )

    bucket = root / "bucket"
    for split in counts:
        part = sorted((im for im in images if im.split == split), key=lambda im: im.image_id)
        (bucket / split).mkdir(parents=True, exist_ok=True)
        _write_split_metadata(root, split, part, base_url)
        for im in part:
            (bucket / split / f"{im.image_id}.jpg").write_bytes(im.jpeg)
    manifest = {
        "classes": [c.__dict__ for c in classes],
        "counts": counts,
        "base_url": base_url,
        "seed": seed,
    }
    (root / "synth.json").write_text(json.dumps(manifest, indent=2, default=list))
    return SynthDataset(root, classes, images, bucket)


def _write_split_metadata(root: Path, split: str, part: list[SynthImage], base_url: str) -> None:
    """The split's box, image index and image-level label CSVs, in the V6/V7 layouts."""
    with open(root / FILES["boxes"][split], "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(BOX_HEADER_V6 if split == "train" else BOX_HEADER_V6[:13])
        for im in part:
            for b in im.boxes:
                row = [
                    im.image_id,
                    "xclick",
                    b["LabelName"],
                    1,
                    f"{b['XMin']:.6f}",
                    f"{b['XMax']:.6f}",
                    f"{b['YMin']:.6f}",
                    f"{b['YMax']:.6f}",
                    b["IsOccluded"],
                    b["IsTruncated"],
                    b["IsGroupOf"],
                    b["IsDepiction"],
                    b["IsInside"],
                ]
                if split == "train":
                    row += [-1] * 8
                w.writerow(row)
    with open(root / FILES["images"][split], "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(IMAGE_HEADER)
        for im in part:
            md5 = base64.b64encode(hashlib.md5(im.jpeg).digest()).decode()
            w.writerow(
                [
                    im.image_id,
                    split,
                    f"{base_url}/original/{split}/{im.image_id}.jpg",
                    f"https://www.flickr.com/photos/demo/{int(im.image_id[:8], 16)}",
                    "https://creativecommons.org/licenses/by/2.0/",
                    "",
                    "oiod demo",
                    f"synthetic {im.image_id}",
                    len(im.jpeg),
                    md5,
                    f"{base_url}/thumb/{split}/{im.image_id}.jpg",
                    im.rotation,
                ]
            )
    with open(root / FILES["image_labels"][split], "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        for im in part:
            for mid, conf in sorted(im.labels.items()):
                w.writerow([im.image_id, "verification", mid, conf])


def upright_boxes(image: SynthImage) -> list[dict]:
    """The image's boxes after applying its Rotation (what a correct pipeline must produce)."""
    k = (4 - (image.rotation // 90) % 4) % 4
    return [rotate_box_cw(b, k) for b in image.boxes]
