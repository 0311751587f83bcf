"""Scoring detections against the shards' ground truth, shared by ``evaluate`` and ``predict``.

:func:`iter_batches` reads committed TFRecord shards in a fixed order (the same images for
``oiod evaluate`` and ``oiod predict``); :func:`parse_ground_truth` turns one serialized
tf.Example into pixel boxes and labels without TensorFlow; :class:`Scorer` feeds each image to
the Open Images metric, COCO and the error analysis with the same boxes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openimages_od.config import Config
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.storage import Storage

__all__ = ["GroundTruth", "Scorer", "iter_batches", "parse_ground_truth"]


@dataclass
class GroundTruth:
    """One image's annotations from its tf.Example (boxes in pixels)."""

    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    group_of: np.ndarray
    positive: set[int] | None
    negative: set[int] | None
    image_id: str = ""
    encoded: bytes = field(default=b"", repr=False)
    source_id: int | None = None


def parse_ground_truth(serialized: bytes) -> GroundTruth:
    """Ground truth of one serialized tf.Example with the shard contract's keys (no TensorFlow needed).

    ``group_of`` is True only where ``image/object/group_of`` (or, without it,
    ``is_crowd``) is 1: the shards write -1 for "unknown". Image-level labels
    with confidence >= 0.5 are verified present, the others verified absent; an
    image without them has ``positive``/``negative`` None (scored on its box
    classes only).
    """
    from openimages_od.pipeline.example import decode_example
    from openimages_od.training.oid_metric import as_group_of

    f = decode_example(serialized)

    def floats(k: str) -> np.ndarray:
        return np.asarray(f.get(k, ()), dtype=np.float64)

    w = int(f["image/width"][0])
    h = int(f["image/height"][0])
    ymin, xmin, ymax, xmax = (floats(f"image/object/bbox/{k}") for k in ("ymin", "xmin", "ymax", "xmax"))
    boxes = np.stack([ymin * h, xmin * w, ymax * h, xmax * w], axis=1) if len(ymin) else np.zeros((0, 4))
    labels = np.asarray(f.get("image/object/class/label", ()), dtype=np.int64)
    raw_group = f.get("image/object/group_of") or f.get("image/object/is_crowd") or [0] * len(labels)
    positive = negative = None
    if "image/class/label" in f:
        image_labels = list(f["image/class/label"])
        conf = list(f.get("image/class/confidence", ())) or [1.0] * len(image_labels)
        positive = {int(c) for c, s in zip(image_labels, conf) if s >= 0.5}
        negative = {int(c) for c, s in zip(image_labels, conf) if s < 0.5}
    name = bytes(f["image/filename"][0]).decode() if "image/filename" in f else ""
    sid = bytes(f["image/source_id"][0]).decode() if "image/source_id" in f else ""
    return GroundTruth(
        w,
        h,
        boxes,
        labels,
        as_group_of(raw_group),
        positive,
        negative,
        name,
        bytes(f["image/encoded"][0]),
        int(sid) if sid.isdigit() else None,
    )


def iter_batches(files: list[str], batch_size: int, max_images: int | None = None) -> Iterator[list[bytes]]:
    """Serialized examples of ``files`` in order, in lists of ``batch_size`` (TFRecord framing checked).

    The same order and the same ``max_images`` cut for ``evaluate`` and
    ``predict``, so both see the same images.
    """
    import mmap

    from openimages_od.pipeline.tfrecord import iter_records

    batch: list[bytes] = []
    n = 0
    for path in files:
        if max_images is not None and n >= max_images:
            break
        with open(path, "rb") as fh:
            if Path(path).stat().st_size == 0:
                continue
            # Memory-mapped, so a large shard is not read into memory at once.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for rec in iter_records(data, source=path):  # type: ignore[arg-type]
                    if max_images is not None and n >= max_images:
                        break
                    batch.append(rec)
                    n += 1
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
    if batch:
        yield batch


class Scorer:
    """The metric code shared by ``oiod evaluate`` and ``oiod evaluate --predictions``.

    Every image goes to the Open Images metric, COCO and the error analysis
    with the same pixel boxes, so the two commands give the same figures for
    the same detections.

    Args:
        cfg: the project config (``evaluate`` section).
        label_map: the classes.
        hierarchy: class relations for the Open Images metric, or None.
    """

    def __init__(self, cfg: Config, label_map: LabelMap, hierarchy: Any = None) -> None:
        from openimages_od.training.analysis import ErrorAnalysis
        from openimages_od.training.coco_metric import CocoAccumulator
        from openimages_od.training.oid_metric import OpenImagesMetric

        ec = cfg.evaluate
        self.ec = ec
        self.hierarchy = hierarchy
        names = {c.id: c.name for c in label_map}
        ids = [c.id for c in label_map]
        self.oid = OpenImagesMetric(
            ids, hierarchy, ec.iou_threshold, names, group_of_weight=ec.group_of_weight
        )
        self.coco = CocoAccumulator(ids, names)
        self.analysis = ErrorAnalysis(
            ids, names, ec.iou_threshold, ec.analysis_min_score, worst_per_class=ec.analysis_worst_images
        )
        self.num_images = 0

    def add(self, g: GroundTruth, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """One image's detections: pixel boxes ``[ymin, xmin, ymax, xmax]``, scores, label-map ids."""
        from openimages_od.training.oid_metric import ImageDetections, ImageGroundTruth

        self.oid.add_image(
            ImageGroundTruth(g.boxes, g.labels, g.group_of, g.positive, g.negative),
            ImageDetections(boxes, scores, labels),
        )
        self.coco.add_image(g.width, g.height, g.boxes, g.labels, g.group_of, boxes, scores, labels)
        self.analysis.add(
            g.image_id, g.width, g.height, g.boxes, g.labels, g.group_of, boxes, scores, labels, g.encoded
        )
        self.num_images += 1

    def metrics(self) -> dict[str, Any]:
        """``{"coco": ..., "openimages": ...}`` for the sections in ``evaluate.metrics``."""
        out: dict[str, Any] = {}
        if "coco" in self.ec.metrics:
            out["coco"] = self.coco.result()
        if "openimages" in self.ec.metrics:
            r = self.oid.result()
            out["openimages"] = {
                "mAP": r["mAP"],
                "iou_threshold": r["iou_threshold"],
                "group_of_weight": r["group_of_weight"],
                "hierarchy": self.hierarchy is not None,
                "num_classes_scored": r["num_classes_scored"],
                "per_class": {str(cid): v for cid, v in r["per_class"].items()},
            }
        return out

    def write_analysis(self, storage: Storage, eval_url: str, suffix: str) -> None:
        """``analysis{suffix}.json`` (counts, confusion, worst images) and ``outcomes{suffix}.csv``."""
        from openimages_od.config import join_url

        storage.write_json(join_url(eval_url, f"analysis{suffix}.json"), self.analysis.result())
        storage.write_text(join_url(eval_url, f"outcomes{suffix}.csv"), self.analysis.outcomes_csv())
