"""Export committed shards to the layouts other tools read (``oiod export-dataset``).

A format is one module with a :class:`~openimages_od.convert.base.FormatWriter`
subclass and one line in :data:`FORMATS` (``name -> "module:Class"``, imported
only when used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads FORMATS for --help: keep this module import-light
    from openimages_od.convert.base import FormatWriter

__all__ = ["FORMATS", "writer_class"]

FORMATS: dict[str, str] = {
    "coco": "openimages_od.convert.coco:CocoWriter",
    "yolo": "openimages_od.convert.yolo:YoloWriter",
    "voc": "openimages_od.convert.voc:VocWriter",
}


def writer_class(name: str) -> type[FormatWriter]:
    """The writer registered as ``name``.

    Raises:
        KeyError: no such format.
    """
    module, cls = FORMATS[name].split(":")
    writer: type[FormatWriter] = getattr(importlib.import_module(module), cls)
    return writer
