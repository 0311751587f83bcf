"""Ultralytics YOLO layout: ``images/{split}/{image_id}.jpg``, ``labels/{split}/{image_id}.txt``, ``data.yaml``.

Each label line is ``class cx cy w h`` with coordinates normalised to the image
(as the shards store them). YOLO wants contiguous class indices, and label-map
ids may have gaps (retired classes), so the class index is the position of the
id in the label map's id order; ``data.yaml`` maps index -> display name and the
order is recorded with MIDs and label-map ids in ``export.json``. An image
without boxes gets an empty label file (a background image to Ultralytics).
"""

from __future__ import annotations

from typing import Any, ClassVar

import yaml

from openimages_od.convert.base import FormatWriter, fmt_float
from openimages_od.convert.reader import Sample
from openimages_od.errors import DataError
from openimages_od.storage import local_path

__all__ = ["YoloWriter", "data_yaml_key"]

# Ultralytics' data.yaml keys for Open Images' split names.
_YAML_KEYS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def data_yaml_key(split: str) -> str:
    """The ``data.yaml`` key a split is listed under (``validation`` -> ``val``)."""
    return _YAML_KEYS.get(split, split)


class YoloWriter(FormatWriter):
    """YOLO txt labels, images and ``data.yaml`` (see the module docstring)."""

    name: ClassVar[str] = "yolo"
    owned: ClassVar[tuple[str, ...]] = ("images/", "labels/", "data.yaml")

    def begin_split(self, split: str) -> None:
        self._split = split
        self._index = {c.id: i for i, c in enumerate(self.classes)}

    def add(self, sample: Sample) -> None:
        self.target.put(f"images/{self._split}/{sample.image_id}.{sample.extension}", sample.encoded)
        lines = []
        for b in sample.boxes:
            cls = self._index.get(b.label)
            if cls is None:
                raise DataError(f"image {sample.image_id}: box label {b.label} is not in the label map")
            cx, cy = (b.xmin + b.xmax) / 2, (b.ymin + b.ymax) / 2
            w, h = b.xmax - b.xmin, b.ymax - b.ymin
            lines.append(f"{cls} {fmt_float(cx)} {fmt_float(cy)} {fmt_float(w)} {fmt_float(h)}\n")
        self.target.put(f"labels/{self._split}/{sample.image_id}.txt", "".join(lines).encode())

    def end_split(self, split: str) -> list[str]:
        return []

    def finish(self, splits: list[str]) -> list[str]:
        lp = local_path(self.target.root)
        doc: dict[str, Any] = {"path": str(lp) if lp is not None else self.target.root}
        for split in splits:
            doc[data_yaml_key(split)] = f"images/{split}"
        doc["names"] = {i: c.name for i, c in enumerate(self.classes)}
        text = "# Written by oiod export-dataset; class index = position in the label map's id order.\n"
        text += yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        self.target.write_now("data.yaml", text.encode())
        return ["data.yaml"]

    def describe(self) -> dict[str, Any]:
        return {
            "classes": [
                {"index": i, "id": c.id, "mid": c.mid, "name": c.name} for i, c in enumerate(self.classes)
            ]
        }
