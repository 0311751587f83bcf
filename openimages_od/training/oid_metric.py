"""The Open Images detection metric (AP@IoU per class and its mean), pure numpy.

The rules of the Open Images Challenge evaluation:

* **Hierarchy.** Ground-truth boxes and detections are expanded up the class
  hierarchy: a "Car" box is also a "Vehicle" box, a "Car" detection also a
  "Vehicle" detection (same box and score). Verified-present image labels go
  up the hierarchy too; verified-absent labels go down (no "Vehicle" means no
  "Car"). Only classes of the label map are kept.
* **Group-of boxes.** A box is group-of only when its ``IsGroupOf`` is 1:
  ``-1`` (unknown, e.g. every box of the V2 8-column train layout) and 0 are
  ordinary boxes (integer arrays are compared with ``== 1``, never cast to
  bool). Detections are first matched greedily (by score) to
  non-group-of boxes by IoU: the detection's best-IoU box, if unclaimed and
  IoU >= threshold, makes it a true positive; if already claimed, a false
  positive. A detection that is not a true positive and whose best
  intersection-over-detection-area with a group-of box is >= threshold is
  neither rewarded nor penalised on its own: each group-of box with at least
  one such detection counts once, as ``group_of_weight`` of a true positive
  with the highest of their scores, and every group-of box counts as
  ``group_of_weight`` ground-truth instances (1.0, the challenge's default;
  0 ignores group-of boxes as the V2 protocol did).
* **Verified image labels** (the challenge evaluator's rule). A class is
  scored on an image only if it is verified there (an image-level label,
  present or absent) or has a box there; detections of any other class on
  that image are ignored. An image with no image-level labels at all is
  scored on its box classes only.
* **Invalid detections** (``ymin >= ymax`` or ``xmin >= xmax``) are dropped.
* **AP** is the area under the precision/recall curve after making precision
  monotonically non-increasing (all recall points, as VOC 2010+).
  Classes without ground truth have no AP and are left out of the mean.

Coordinates are ``[ymin, xmin, ymax, xmax]`` in any consistent unit (pixels
recommended: IoU is not invariant to non-uniform scaling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from openimages_od.training.box_ops import ioa_matrix, iou_matrix

__all__ = [
    "Hierarchy",
    "ImageDetections",
    "ImageGroundTruth",
    "OpenImagesMetric",
    "as_group_of",
    "average_precision",
    "hierarchy_from_json",
    "pr_curve",
]


# init=False: ``group_of`` may be left out (no group-of boxes) but is always an array afterwards.
@dataclass(init=False)
class ImageGroundTruth:
    """Ground truth of one image.

    Attributes:
        boxes: [n, 4] ``ymin, xmin, ymax, xmax``.
        labels: [n] class ids.
        group_of: [n] bool, or Open Images' integer ``IsGroupOf`` (1 yes, 0 no, -1 unknown):
            only 1 is group-of. None (the default) means no box is group-of.
        positive_labels: verified-present class ids (None or empty: none).
        negative_labels: verified-absent class ids (None or empty: none).
    """

    boxes: np.ndarray
    labels: np.ndarray
    group_of: np.ndarray
    positive_labels: set[int] | None
    negative_labels: set[int] | None

    def __init__(
        self,
        boxes: np.ndarray,
        labels: np.ndarray,
        group_of: np.ndarray | None = None,
        positive_labels: set[int] | None = None,
        negative_labels: set[int] | None = None,
    ) -> None:
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.group_of = as_group_of(np.zeros(len(self.labels), dtype=bool) if group_of is None else group_of)
        self.positive_labels = positive_labels
        self.negative_labels = negative_labels
        if not (len(self.boxes) == len(self.labels) == len(self.group_of)):
            raise ValueError("boxes, labels and group_of must have the same length")


def as_group_of(values: object) -> np.ndarray:
    """Open Images ``IsGroupOf`` values -> bool: True only for 1 (``-1`` means unknown, not group-of).

    A bool array is returned as is; anything else is compared with ``== 1``
    (a plain ``astype(bool)`` would turn ``-1`` into True).
    """
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == bool:
        return arr
    return arr == 1


@dataclass
class ImageDetections:
    """Detections of one image: ``boxes`` [m, 4], ``scores`` [m], ``labels`` [m]."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (len(self.boxes) == len(self.scores) == len(self.labels)):
            raise ValueError("boxes, scores and labels must have the same length")


@dataclass
class Hierarchy:
    """Ancestor/descendant relations between class ids (each excludes the class itself)."""

    ancestors: dict[int, set[int]] = field(default_factory=dict)
    descendants: dict[int, set[int]] = field(default_factory=dict)

    def up(self, cid: int) -> set[int]:
        return {cid} | self.ancestors.get(cid, set())

    def down(self, cid: int) -> set[int]:
        return {cid} | self.descendants.get(cid, set())


def hierarchy_from_json(tree: Mapping, mid_to_id: Mapping[str, int]) -> Hierarchy:
    """Build a :class:`Hierarchy` over label-map ids from the Open Images hierarchy JSON.

    Only ``Subcategory`` edges are subclass relations (``Part`` is not). A
    class may have several parents. MIDs outside ``mid_to_id`` (including the
    root) are traversed but not kept, so a label-map class under an
    unselected intermediate class still reaches its selected ancestors.
    """
    anc_mid: dict[str, set[str]] = {}

    def walk(node: Mapping, path: tuple[str, ...]) -> None:
        mid = node.get("LabelName")
        if mid:
            anc_mid.setdefault(mid, set()).update(path)
        sub_path = path + ((mid,) if mid else ())
        for child in node.get("Subcategory", []) or []:
            walk(child, sub_path)

    walk(tree, ())
    h = Hierarchy()
    for mid, ancestors in anc_mid.items():
        cid = mid_to_id.get(mid)
        if cid is None:
            continue
        ids = {mid_to_id[a] for a in ancestors if a in mid_to_id and a != mid}
        if ids:
            h.ancestors.setdefault(cid, set()).update(ids)
            for a in ids:
                h.descendants.setdefault(a, set()).add(cid)
    return h


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: float) -> float:
    """AP from scored true/false positives and the number of ground-truth instances.

    ``tp`` may be weights (a group-of hit counts ``group_of_weight``); an entry
    <= 0 is a false positive. Returns NaN when ``num_gt`` is 0 (the class is not scored).
    """
    if num_gt <= 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(tp, dtype=np.float64)[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(tp <= 0)  # a group-of hit weighs group_of_weight as a TP and nothing as a FP
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    recall = ctp / num_gt
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    idx = np.where(r[1:] != r[:-1])[0] + 1
    return float(np.sum((r[idx] - r[idx - 1]) * p[idx]))


def pr_curve(scores: np.ndarray, tp: np.ndarray, num_gt: float, max_points: int = 101) -> dict | None:
    """Precision and recall along the score-ranked detections (for plots), at most ``max_points`` points.

    Returns None when the class has no ground truth or no detections.
    """
    if num_gt <= 0 or len(scores) == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tps = np.asarray(tp, dtype=np.float64)[order]
    ctp = np.cumsum(tps)
    precision, recall = ctp / np.maximum(ctp + np.cumsum(tps <= 0), 1e-12), ctp / num_gt
    keep = np.unique(np.linspace(0, len(ctp) - 1, min(max_points, len(ctp))).round().astype(int))
    return {
        "recall": [round(float(x), 5) for x in recall[keep]],
        "precision": [round(float(x), 5) for x in precision[keep]],
    }


class OpenImagesMetric:
    """Accumulates images and computes per-class AP and mAP.

    Args:
        class_ids: the classes to report (label-map ids).
        hierarchy: class relations for expansion; None = no expansion.
        iou_threshold: matching threshold for IoU (boxes) and IoA (group-of boxes).
        class_names: optional id -> name for the report.
        group_of_weight: what a group-of box weighs, as ground truth and as a
            true positive (1.0 in the challenge; 0 ignores group-of boxes).
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        hierarchy: Hierarchy | None = None,
        iou_threshold: float = 0.5,
        class_names: Mapping[int, str] | None = None,
        group_of_weight: float = 1.0,
    ) -> None:
        self.class_ids = [int(c) for c in class_ids]
        self.hierarchy = hierarchy
        self.iou_threshold = float(iou_threshold)
        self.group_of_weight = float(group_of_weight)
        self.class_names = dict(class_names or {})
        self._scores: dict[int, list[np.ndarray]] = {c: [] for c in self.class_ids}
        self._tp: dict[int, list[np.ndarray]] = {c: [] for c in self.class_ids}
        self._num_gt: dict[int, float] = {c: 0.0 for c in self.class_ids}
        self._num_images = 0

    # ---------------------------------------------------------------- expansion

    def _expand_gt(self, gt: ImageGroundTruth) -> ImageGroundTruth:
        if self.hierarchy is None:
            return gt
        seen: set[tuple] = set()
        boxes, labels, group = [], [], []
        for box, label, g in zip(gt.boxes, gt.labels, gt.group_of):
            for cid in sorted(self.hierarchy.up(int(label))):
                key = (cid, bool(g), *np.round(box, 6))
                if key in seen:  # already expanded in the data (plan.expand_hierarchy)
                    continue
                seen.add(key)
                boxes.append(box)
                labels.append(cid)
                group.append(g)
        pos = neg = None
        if gt.positive_labels is not None:
            pos = (
                set().union(*(self.hierarchy.up(c) for c in gt.positive_labels))
                if gt.positive_labels
                else set()
            )
        if gt.negative_labels is not None:
            neg = (
                set().union(*(self.hierarchy.down(c) for c in gt.negative_labels))
                if gt.negative_labels
                else set()
            )
        return ImageGroundTruth(
            np.array(boxes).reshape(-1, 4),
            np.array(labels, dtype=np.int64),
            np.array(group, dtype=bool),
            pos,
            neg,
        )

    def _expand_det(self, det: ImageDetections) -> ImageDetections:
        if self.hierarchy is None or len(det.labels) == 0:
            return det
        boxes, scores, labels = [], [], []
        for box, score, label in zip(det.boxes, det.scores, det.labels):
            for cid in sorted(self.hierarchy.up(int(label))):
                boxes.append(box)
                scores.append(score)
                labels.append(cid)
        return ImageDetections(np.array(boxes).reshape(-1, 4), np.array(scores), np.array(labels))

    # ---------------------------------------------------------------- per image

    def add_image(self, gt: ImageGroundTruth, det: ImageDetections) -> None:
        """Score one image's detections against its ground truth."""
        gt = self._expand_gt(gt)
        det = self._expand_det(det)
        self._num_images += 1
        # The challenge evaluator's rule: verified labels (either way) plus box classes; an image
        # without image-level labels is scored on its box classes only, never on every class.
        evaluable = (
            set(gt.positive_labels or ()) | set(gt.negative_labels or ()) | {int(x) for x in gt.labels}
        )
        valid = (det.boxes[:, 0] < det.boxes[:, 2]) & (det.boxes[:, 1] < det.boxes[:, 3])
        for cid in self.class_ids:
            if cid not in evaluable:
                continue
            gmask = gt.labels == cid
            dmask = (det.labels == cid) & valid
            n_group = int((gmask & gt.group_of).sum())
            self._num_gt[cid] += int(gmask.sum()) - n_group + self.group_of_weight * n_group
            if not dmask.any():
                continue
            scores, tp = self._match(det.boxes[dmask], det.scores[dmask], gt.boxes[gmask], gt.group_of[gmask])
            self._scores[cid].append(scores)
            self._tp[cid].append(tp)

    def _match(
        self, dboxes: np.ndarray, dscores: np.ndarray, gboxes: np.ndarray, ggroup: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-dscores, kind="stable")
        dboxes, dscores = dboxes[order], dscores[order]
        n = len(dscores)
        tp = np.zeros(n, dtype=bool)
        thr = self.iou_threshold
        boxes_single = gboxes[~ggroup]
        boxes_group = gboxes[ggroup]
        if len(boxes_single):
            iou = iou_matrix(dboxes, boxes_single)
            best = iou.argmax(axis=1)
            claimed = np.zeros(len(boxes_single), dtype=bool)
            for i in range(n):
                j = best[i]
                if iou[i, j] >= thr and not claimed[j]:
                    tp[i] = True
                    claimed[j] = True
        in_group = np.zeros(n, dtype=bool)
        group_scores = np.zeros(len(boxes_group))
        group_hit = np.zeros(len(boxes_group), dtype=bool)
        if len(boxes_group):
            ioa = ioa_matrix(dboxes, boxes_group)
            best = ioa.argmax(axis=1)
            for i in range(n):
                j = best[i]
                if not tp[i] and ioa[i, j] >= thr:
                    in_group[i] = True
                    group_hit[j] = True
                    group_scores[j] = max(group_scores[j], dscores[i])
        keep = ~in_group
        # As the challenge evaluator: a group-of box counts when hit with a positive score and a
        # positive weight (weight 0: the detections inside it are ignored altogether).
        counted = group_hit & (group_scores > 0) & (self.group_of_weight > 0)
        scores = np.concatenate([dscores[keep], group_scores[counted]])
        labels = np.concatenate(
            [tp[keep].astype(np.float64), np.full(int(counted.sum()), self.group_of_weight)]
        )
        return scores, labels

    # ---------------------------------------------------------------- result

    def result(self) -> dict:
        """``{"mAP", "per_class": {id: {"ap", "name", "num_gt", "num_detections"}}, "num_images", "num_classes_scored"}``.

        ``ap`` is None for classes with no ground truth (excluded from the mean).
        """
        per_class = {}
        aps = []
        for cid in self.class_ids:
            scores = np.concatenate(self._scores[cid]) if self._scores[cid] else np.zeros(0)
            tp = np.concatenate(self._tp[cid]) if self._tp[cid] else np.zeros(0)
            ap = average_precision(scores, tp, self._num_gt[cid])
            if not np.isnan(ap):
                aps.append(ap)
            per_class[cid] = {
                "ap": None if np.isnan(ap) else ap,
                "name": self.class_names.get(cid, str(cid)),
                "num_gt": int(self._num_gt[cid])
                if float(self._num_gt[cid]).is_integer()
                else self._num_gt[cid],
                "num_detections": len(scores),
                "pr_curve": pr_curve(scores, tp, self._num_gt[cid]),
            }
        return {
            "mAP": float(np.mean(aps)) if aps else None,
            "per_class": per_class,
            "num_images": self._num_images,
            "num_classes_scored": len(aps),
            "iou_threshold": self.iou_threshold,
            "group_of_weight": self.group_of_weight,
        }
