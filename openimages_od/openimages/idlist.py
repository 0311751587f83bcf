"""``selection.image_ids``: the ImageIDs a plan is restricted to, from the config or a file.

A file holds one ImageID a line (``#`` starts a comment, blank lines are skipped), or is a CSV
whose header has an ``ImageID`` column (an Open Images box, label or image-index file works).
Ids are compared exactly (Open Images ids are lower-case hex).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.errors import ConfigError, DataError
from openimages_od.openimages.idkeys import IdSet
from openimages_od.openimages.inputs import MetadataInputs

__all__ = ["ImageIdList", "load_image_ids", "parse_image_ids"]

_ID = re.compile(r"[0-9a-fA-F]{16}")
_SHOWN = 5  # malformed ids named in the error
UNMATCHED_LISTED = 100  # unmatched ids listed in plan/stats.json (all are counted)


def parse_image_ids(text: str, display: str) -> list[str]:
    """The ImageIDs of an id-list file's ``text`` (duplicates kept; the caller de-duplicates).

    Raises:
        DataError: malformed ids (the first few named with ``display:line``), or a CSV header
            without an ``ImageID`` column.
    """
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")), None)
    if first is None:
        return []
    head = lines[first]
    out: list[str] = []
    bad: list[tuple[int, str]] = []
    col = None
    if "," in head:
        names = [c.strip().lstrip("\ufeff") for c in next(csv.reader([head]))]
        if "ImageID" not in names:
            raise DataError(f"{display}:{first + 1}: a CSV header without an ImageID column ({head[:120]!r})")
        col = names.index("ImageID")
    for k, ln in enumerate(lines):
        if k < first or (col is not None and k == first):
            continue
        if col is None:
            v = ln.split("#", 1)[0].strip()
        elif not ln.strip() or ln.lstrip().startswith("#"):
            v = ""
        else:
            row = next(csv.reader([ln]))
            v = row[col].strip() if col < len(row) else ""
            if not v:
                bad.append((k + 1, ln))
                continue
        if not v:
            continue
        if _ID.fullmatch(v):
            out.append(v)
        else:
            bad.append((k + 1, v))
    if bad:
        shown = "; ".join(f"{display}:{n}: {v[:40]!r}" for n, v in bad[:_SHOWN])
        more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        raise DataError(
            f"selection.image_ids: {len(bad)} line(s) are not ImageIDs (16 hex digits): {shown}{more}"
        )
    return out


@dataclass
class ImageIdList:
    """The listed ImageIDs (unique, sorted), where they came from, and which a plan matched."""

    ids: pa.Array
    source: str
    matched: np.ndarray  # per id: seen in some planned split's metadata

    def __post_init__(self) -> None:
        self.members = IdSet(self.ids)

    def mark_seen(self, seen: pa.Array) -> None:
        """Record the ImageIDs a split's metadata holds (boxes and image-level labels of the
        classes read)."""
        if len(seen) and len(self.ids):
            self.matched |= pc.is_in(self.ids, value_set=pc.unique(seen)).to_numpy(zero_copy_only=False)

    def stats(self) -> dict[str, object]:
        """The ``image_ids`` entry of ``plan/stats.json``."""
        unmatched = self.ids.filter(pa.array(~self.matched)) if len(self.ids) else self.ids
        return {
            "source": self.source,
            "listed": len(self.ids),
            "unmatched": len(unmatched),
            "unmatched_ids": unmatched.slice(0, UNMATCHED_LISTED).to_pylist(),
        }


def load_image_ids(value: list[str] | str, inputs: MetadataInputs) -> ImageIdList:
    """``selection.image_ids`` resolved: a list as given, or a file read through the storage layer.

    Raises:
        ConfigError: the file does not exist.
        DataError: malformed lines (see :func:`parse_image_ids`).
    """
    if isinstance(value, str):
        try:
            text = inputs.text(value)
        except FileNotFoundError:
            raise ConfigError(f"selection.image_ids: {value} not found") from None
        ids = parse_image_ids(text, value)
        source = value
    else:
        ids, source = list(value), "selection.image_ids"
    arr = pa.array(sorted(set(ids)), pa.string())
    return ImageIdList(arr, source, np.zeros(len(arr), bool))
