"""Prediction files: the Open Images challenge CSV and COCO results JSON, written and read.

* **Challenge CSV** (what TF OD API's ``oid_challenge_evaluation.py`` reads):
  header ``ImageID,LabelName,Score,XMin,XMax,YMin,YMax``; ``LabelName`` is
  the MID, coordinates are normalized to ``[0, 1]`` relative to the image.
* **COCO results JSON**: a list of ``{"image_id", "category_id", "bbox",
  "score"}`` with ``bbox = [x, y, width, height]`` in pixels;
  ``image_id`` is the image's stable ``source_id``
  (:func:`openimages_od.openimages.ids.source_id`) and ``category_id`` the
  label-map id.

Floats are written with Python's shortest round-trip repr of the model's
float32 values, so reading a file back gives the very numbers the model
produced (``oiod evaluate --predictions`` reproduces ``oiod evaluate``).
Boxes are relative to the images as prepared (the shards: after
``Rotation``), which is also what ``oiod predict`` sees.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openimages_od.errors import DataError
from openimages_od.openimages.labelmap import LabelMap

__all__ = ["CSV_HEADER", "ImagePrediction", "Predictions", "challenge_csv", "coco_json", "read_predictions"]

CSV_HEADER = ["ImageID", "LabelName", "Score", "XMin", "XMax", "YMin", "YMax"]


@dataclass
class ImagePrediction:
    """One image's detections: normalized ``[ymin, xmin, ymax, xmax]`` boxes, scores, label-map ids."""

    image_id: str
    source_id: int
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def _f(v: Any) -> str:
    return repr(float(v))


def challenge_csv(preds: Iterable[ImagePrediction], labels: LabelMap) -> str:
    """The challenge CSV text for ``preds`` (detections of unknown classes are skipped)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for p in preds:
        for (y0, x0, y1, x1), s, c in zip(p.boxes, p.scores, p.classes):
            cls = labels.by_id.get(int(c))
            if cls is not None:
                w.writerow([p.image_id, cls.mid, _f(s), _f(x0), _f(x1), _f(y0), _f(y1)])
    return buf.getvalue()


def coco_json(preds: Iterable[ImagePrediction], labels: LabelMap) -> str:
    """The COCO results JSON text for ``preds`` (``image_id`` = source_id, pixel ``[x, y, w, h]``)."""
    out = []
    for p in preds:
        for (y0, x0, y1, x1), s, c in zip(p.boxes, p.scores, p.classes):
            if int(c) not in labels.by_id:
                continue
            px0, py0 = float(x0) * p.width, float(y0) * p.height
            out.append(
                {
                    "image_id": int(p.source_id),
                    "category_id": int(c),
                    "bbox": [px0, py0, float(x1) * p.width - px0, float(y1) * p.height - py0],
                    "score": float(s),
                }
            )
    return json.dumps(out, separators=(",", ":")) + "\n"


@dataclass
class Predictions:
    """Detections read from a file, per ImageID, in pixels of each image."""

    by_image: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    num_read: int = 0
    unknown_images: int = 0  # predictions for images not in the ground truth (ignored)
    unknown_labels: int = 0  # predictions of classes outside the label map (ignored)
    format: str = ""

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.by_image.get(image_id, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)))


def _sniff(text: str, name: str) -> str:
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        return "coco"
    if name.lower().endswith(".json"):
        return "coco"
    return "csv"


def read_predictions(
    text: str,
    name: str,
    labels: LabelMap,
    images: Mapping[str, tuple[int, int, int | None]],
    fmt: str = "auto",
) -> Predictions:
    """Parse a challenge CSV or COCO results JSON into pixel detections per ImageID.

    Args:
        text: the file's content.
        name: its URL (for messages and format sniffing).
        labels: the label map (CSV ``LabelName`` is a MID; COCO ``category_id`` a label-map id).
        images: ImageID -> (width, height, source_id) of the ground-truth images.
        fmt: ``csv``, ``coco`` or ``auto`` (JSON if the text starts with ``[``/``{`` or the name ends ``.json``).

    Raises:
        DataError: malformed file, naming the file, the line or entry and what was wrong.
    """
    fmt = _sniff(text, name) if fmt == "auto" else fmt
    rows: dict[str, list[tuple[float, float, float, float, float, int]]] = {}
    out = Predictions(format=fmt)
    if fmt == "coco":
        by_sid = {sid: iid for iid, (_, _, sid) in images.items() if sid is not None}
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(doc, dict) and "annotations" in doc:
            doc = doc["annotations"]
        if not isinstance(doc, list):
            raise DataError(f"{name}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
        for k, d in enumerate(doc):
            try:
                sid, cid, score = int(d["image_id"]), int(d["category_id"]), float(d["score"])
                x, y, w, h = (float(v) for v in d["bbox"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{name}: entry {k} is not {{image_id: int, category_id: int, "
                    f"bbox: [x, y, w, h], score: number}}: {str(d)[:120]}"
                ) from None
            out.num_read += 1
            iid = by_sid.get(sid)
            if iid is None:
                out.unknown_images += 1
                continue
            if cid not in labels.by_id:
                out.unknown_labels += 1
                continue
            rows.setdefault(iid, []).append((y, x, y + h, x + w, score, cid))
    else:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: empty file (expected the header {','.join(CSV_HEADER)})")
        header = [h.strip() for h in header]
        header = ["ImageID" if h == "ImageId" else h for h in header]
        missing = [c for c in CSV_HEADER if c not in header]
        if missing:
            raise DataError(
                f"{name}: line 1: missing column(s) {missing}; expected {','.join(CSV_HEADER)} "
                f"(got {','.join(header)})"
            )
        col = {c: header.index(c) for c in CSV_HEADER}
        for lineno, r in enumerate(reader, start=2):
            if not r or not any(f.strip() for f in r):
                continue
            try:
                iid, mid = r[col["ImageID"]], r[col["LabelName"]]
                score = float(r[col["Score"]])
                x0, x1 = float(r[col["XMin"]]), float(r[col["XMax"]])
                y0, y1 = float(r[col["YMin"]]), float(r[col["YMax"]])
            except (IndexError, ValueError):
                raise DataError(
                    f"{name}: line {lineno}: expected {','.join(CSV_HEADER)} with numbers, "
                    f"got {','.join(r)[:120]!r}"
                ) from None
            out.num_read += 1
            dims = images.get(iid)
            if dims is None:
                out.unknown_images += 1
                continue
            cls = labels.by_mid.get(mid)
            if cls is None:
                out.unknown_labels += 1
                continue
            w, h = dims[0], dims[1]
            rows.setdefault(iid, []).append((y0 * h, x0 * w, y1 * h, x1 * w, score, cls.id))
    for iid, items in rows.items():
        a = np.asarray(items, dtype=np.float64)
        out.by_image[iid] = (a[:, :4], a[:, 4], a[:, 5].astype(np.int64))
    return out
