"""COCO box mAP with ``pycocotools`` on in-memory ground truth and detections.

Group-of boxes are passed as ``iscrowd=1`` (COCO's ignore regions), which is
also what Model Garden's decoder does with ``image/object/is_crowd``. Only an
``IsGroupOf`` of 1 is a crowd: ``-1`` (unknown) is an ordinary box.
Boxes are ``[ymin, xmin, ymax, xmax]`` in pixels.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from openimages_od.training.oid_metric import as_group_of

__all__ = ["COCO_STAT_NAMES", "CocoAccumulator"]

COCO_STAT_NAMES = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "ARmax1",
    "ARmax10",
    "ARmax100",
    "ARs",
    "ARm",
    "ARl",
]


class CocoAccumulator:
    """Collect images, then :meth:`result` runs ``COCOeval`` (bbox).

    Args:
        class_ids: category ids (label-map ids).
        class_names: names for the categories.
    """

    def __init__(self, class_ids: Sequence[int], class_names: dict[int, str] | None = None) -> None:
        self.class_ids = [int(c) for c in class_ids]
        self.class_names = class_names or {}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[list[float]] = []

    def add_image(
        self,
        width: int,
        height: int,
        gt_boxes: np.ndarray,
        gt_labels: np.ndarray,
        gt_crowd: np.ndarray | None,
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_labels: np.ndarray,
    ) -> int:
        """Add one image (pixel boxes ``ymin, xmin, ymax, xmax``); returns its COCO image id."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "width": int(width), "height": int(height)})
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        # ``== 1``, not a cast: Open Images writes -1 for "unknown", which must not become a crowd.
        crowd = np.zeros(len(gt_boxes), dtype=int) if gt_crowd is None else as_group_of(gt_crowd).astype(int)
        for box, label, c in zip(gt_boxes, np.asarray(gt_labels).reshape(-1), crowd):
            y0, x0, y1, x1 = box
            w, h = max(0.0, x1 - x0), max(0.0, y1 - y0)
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": int(c),
                }
            )
        for box, score, label in zip(
            np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(det_scores).reshape(-1),
            np.asarray(det_labels).reshape(-1),
        ):
            y0, x0, y1, x1 = box
            self.detections.append([image_id, x0, y0, x1 - x0, y1 - y0, float(score), int(label)])
        return image_id

    def result(self) -> dict:
        """``{"AP": ..., "AP50": ..., ...}`` (COCO's 12 summary numbers; -1 where undefined)."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.images:
            return {k: -1.0 for k in COCO_STAT_NAMES}
        gt = COCO()
        gt.dataset = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": c, "name": self.class_names.get(c, str(c))} for c in self.class_ids],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            if not self.detections:
                return {k: 0.0 if self.annotations else -1.0 for k in COCO_STAT_NAMES}
            dt = gt.loadRes(np.asarray(self.detections, dtype=np.float64))
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {k: float(v) for k, v in zip(COCO_STAT_NAMES, ev.stats)}
