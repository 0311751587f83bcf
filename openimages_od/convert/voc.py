"""Pascal VOC layout: ``JPEGImages/``, ``Annotations/{image_id}.xml``, ``ImageSets/Main/{split}.txt``.

Each object has the class's display name, ``difficult`` 0 (Open Images has no
such flag), ``truncated`` / ``occluded`` when the shards know them (Open
Images' -1, unknown, leaves the element out), and a ``bndbox`` in pixels of the
stored image as decimals (0-based, continuous, like COCO; Open Images boxes are
not on the pixel grid, and rounding would move them). Extra elements ``mid``
and ``group_of`` keep Open Images' identifiers; VOC readers ignore them.
"""

from __future__ import annotations

import io
import shutil
import xml.etree.ElementTree as ET
from typing import IO, ClassVar

from openimages_od.convert.base import FormatWriter, fmt_float
from openimages_od.convert.reader import Sample
from openimages_od.errors import DataError

__all__ = ["VocWriter", "image_depth"]


def image_depth(encoded: bytes) -> int:
    """Channels of an encoded image from its header (3 when it cannot be told)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as im:
            return len(im.getbands())
    except OSError:
        return 3


def _sub(parent: ET.Element, tag: str, text: str | int) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = str(text)
    return el


class VocWriter(FormatWriter):
    """VOC XML annotations, images and image sets (see the module docstring)."""

    name: ClassVar[str] = "voc"
    owned: ClassVar[tuple[str, ...]] = ("JPEGImages/", "Annotations/", "ImageSets/Main/")

    def begin_split(self, split: str) -> None:
        self._split = split
        self._ids_fh: IO[bytes] = open(self.target.spool(f"{split}.ids.txt"), "wb")

    def _xml(self, sample: Sample, file_name: str) -> bytes:
        root = ET.Element("annotation")
        _sub(root, "folder", "JPEGImages")
        _sub(root, "filename", file_name)
        source = ET.SubElement(root, "source")
        _sub(source, "database", "Open Images")
        _sub(source, "source_id", sample.source_id)
        size = ET.SubElement(root, "size")
        _sub(size, "width", sample.width)
        _sub(size, "height", sample.height)
        _sub(size, "depth", image_depth(sample.encoded))
        _sub(root, "segmented", 0)
        w, h = sample.width, sample.height
        for b in sample.boxes:
            cls = self.by_id.get(b.label)
            if cls is None:
                raise DataError(f"image {sample.image_id}: box label {b.label} is not in the label map")
            obj = ET.SubElement(root, "object")
            _sub(obj, "name", cls.name)
            _sub(obj, "mid", b.mid or cls.mid)
            _sub(obj, "pose", "Unspecified")
            if b.truncated in (0, 1):
                _sub(obj, "truncated", b.truncated)
            if b.occluded in (0, 1):
                _sub(obj, "occluded", b.occluded)
            _sub(obj, "difficult", 0)
            _sub(obj, "group_of", 1 if b.group_of == 1 else 0)
            box = ET.SubElement(obj, "bndbox")
            _sub(box, "xmin", fmt_float(b.xmin * w))
            _sub(box, "ymin", fmt_float(b.ymin * h))
            _sub(box, "xmax", fmt_float(b.xmax * w))
            _sub(box, "ymax", fmt_float(b.ymax * h))
        ET.indent(root)
        return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"

    def add(self, sample: Sample) -> None:
        file_name = f"{sample.image_id}.{sample.extension}"
        self.target.put(f"JPEGImages/{file_name}", sample.encoded)
        self.target.put(f"Annotations/{sample.image_id}.xml", self._xml(sample, file_name))
        self._ids_fh.write(sample.image_id.encode() + b"\n")

    def end_split(self, split: str) -> list[str]:
        self._ids_fh.close()
        rel = f"ImageSets/Main/{split}.txt"
        spool = self.target.spool(f"{split}.ids.txt")
        with self.target.open_write(rel) as out, open(spool, "rb") as fh:
            shutil.copyfileobj(fh, out, 8 << 20)
        spool.unlink()
        return [rel]
