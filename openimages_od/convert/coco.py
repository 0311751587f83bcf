"""COCO detection layout: ``annotations/instances_{split}.json`` and ``images/{split}/{image_id}.jpg``.

Category ids are the label map's ids (gaps from retired classes stay gaps), so
a COCO-trained evaluation and this project's detector name classes alike. Boxes
are ``[x, y, width, height]`` in pixels of the stored image; ``iscrowd`` is
Open Images' group-of flag. Open Images identifiers are kept in extra fields
(``mid`` on categories and annotations, ``oid_image_id`` / ``source_id`` on
images, and ``occluded`` / ``truncated`` / ``depiction`` where the shards record
them), which COCO readers ignore.

The JSON document is assembled without holding it in memory: image and
annotation entries are spooled to local files while the split streams by, then
concatenated into one object written atomically through the storage layer.
"""

from __future__ import annotations

import json
import shutil
from typing import IO, Any, ClassVar

from openimages_od.convert.base import FormatWriter
from openimages_od.convert.reader import Sample
from openimages_od.errors import DataError

__all__ = ["CocoWriter"]


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class CocoWriter(FormatWriter):
    """COCO ``instances_{split}.json`` plus the images (see the module docstring)."""

    name: ClassVar[str] = "coco"
    owned: ClassVar[tuple[str, ...]] = ("annotations/", "images/")

    def begin_split(self, split: str) -> None:
        self._split = split
        self._images_fh: IO[str] = open(self.target.spool(f"{split}.images.json"), "w")
        self._anns_fh: IO[str] = open(self.target.spool(f"{split}.annotations.json"), "w")
        self._image_n = 0
        self._ann_n = 0

    def add(self, sample: Sample) -> None:
        self._image_n += 1
        file_name = f"{sample.image_id}.{sample.extension}"
        self.target.put(f"images/{self._split}/{file_name}", sample.encoded)
        image = {
            "id": self._image_n,
            "file_name": file_name,
            "width": sample.width,
            "height": sample.height,
            "oid_image_id": sample.image_id,
            "source_id": sample.source_id,
        }
        self._images_fh.write(("," if self._image_n > 1 else "") + _dump(image))
        w, h = sample.width, sample.height
        for b in sample.boxes:
            if b.label not in self.by_id:
                raise DataError(
                    f"image {sample.image_id}: box label {b.label} is not in the label map "
                    f"(ids {min(self.by_id)}..{max(self.by_id)})"
                )
            self._ann_n += 1
            x, y = b.xmin * w, b.ymin * h
            bw, bh = (b.xmax - b.xmin) * w, (b.ymax - b.ymin) * h
            ann: dict[str, Any] = {
                "id": self._ann_n,
                "image_id": self._image_n,
                "category_id": b.label,
                "bbox": [x, y, bw, bh],
                "area": bw * bh,
                "iscrowd": 1 if b.group_of == 1 else 0,
                "mid": b.mid,
            }
            for key in ("occluded", "truncated", "depiction"):
                val = getattr(b, key)
                if val in (0, 1):
                    ann[key] = val
            self._anns_fh.write(("," if self._ann_n > 1 else "") + _dump(ann))

    def end_split(self, split: str) -> list[str]:
        self._images_fh.close()
        self._anns_fh.close()
        rel = f"annotations/instances_{split}.json"
        head = {
            "info": {
                "description": f"Open Images split {split!r} exported by oiod export-dataset",
                "version": "1",
            },
            "licenses": [],
            "categories": [
                {"id": c.id, "name": c.name, "supercategory": "object", "mid": c.mid} for c in self.classes
            ],
        }
        with self.target.open_write(rel) as out:
            out.write(_dump(head)[:-1].encode() + b',"images":[')
            with open(self.target.spool(f"{split}.images.json"), "rb") as fh:
                shutil.copyfileobj(fh, out, 8 << 20)
            out.write(b'],"annotations":[')
            with open(self.target.spool(f"{split}.annotations.json"), "rb") as fh:
                shutil.copyfileobj(fh, out, 8 << 20)
            out.write(b"]}\n")
        for part in ("images", "annotations"):
            self.target.spool(f"{split}.{part}.json").unlink()
        return [rel]

    def describe(self) -> dict[str, Any]:
        return {"images_dir": "images/{split}", "annotations": "annotations/instances_{split}.json"}
