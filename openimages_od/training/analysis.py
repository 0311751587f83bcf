"""Error analysis of detections: why each prediction is right or wrong, what was missed.

Pure numpy (and Pillow for the drawings); no TensorFlow. For every image the
predictions at or above ``min_score`` are taken in score order and each gets
one outcome (the TIDE/FiftyOne vocabulary):

* ``tp``: IoU >= threshold with an unclaimed ground-truth box of its class, or
  inside (IoA >= threshold) a group-of box of its class;
* ``duplicate``: IoU >= threshold with a box of its class already claimed by a
  higher-scored prediction;
* ``wrong_class``: IoU >= threshold with a box of another class;
* ``localisation``: its class is there but the best IoU is in
  ``[loc_iou, threshold)``;
* ``wrong_class`` too when it overlaps only a box of another class, by an IoU
  in ``[loc_iou, threshold)`` (TIDE's "both" error: the class is wrong and the
  box is off; counted with the class errors, since fixing the box alone would
  not make it right);
* ``background``: none of the above (nothing of any class where it points).

Ground-truth boxes no prediction claimed are ``missed``. The confusion matrix
matches predictions to ground truth by IoU alone (class-agnostic, greedy by
score, as FiftyOne's ``classwise=False``; IoA for group-of boxes, which take
any number of predictions): rows are the ground-truth class or
``(none)`` for a prediction on background, columns the predicted class or
``(missed)`` for an unmatched box. The worst images of each class (most
false positives plus misses of that class) are kept with their drawings.

These are diagnostics at one operating point (``min_score``); the AP figures
come from :mod:`.oid_metric` and :mod:`.coco_metric`.
"""

from __future__ import annotations

import base64
import csv
import heapq
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openimages_od.training.box_ops import ioa_matrix, iou_matrix

__all__ = ["FP_REASONS", "OUTCOMES", "ErrorAnalysis"]

FP_REASONS = ("localisation", "wrong_class", "duplicate", "background")
OUTCOMES = ("tp",) + FP_REASONS
NONE, MISSED = "(none)", "(missed)"


@dataclass(order=True)
class _Worst:
    errors: int
    order: int
    image_id: str = field(compare=False)
    record: dict = field(compare=False)
    encoded: bytes = field(compare=False, repr=False)


class ErrorAnalysis:
    """Accumulates per-prediction outcomes, misses, a confusion matrix and the worst images.

    Args:
        class_ids: label-map ids, in display order.
        class_names: id -> name.
        iou_threshold: matching IoU (and IoA for group-of boxes).
        min_score: predictions below this score are not analysed.
        loc_iou: lowest IoU still called a localisation error.
        worst_per_class: images kept (with drawings) per class.
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        class_names: Mapping[int, str],
        iou_threshold: float = 0.5,
        min_score: float = 0.3,
        loc_iou: float = 0.1,
        worst_per_class: int = 3,
    ) -> None:
        self.class_ids = [int(c) for c in class_ids]
        self.names = {int(k): str(v) for k, v in class_names.items()}
        self.thr = float(iou_threshold)
        self.min_score = float(min_score)
        self.loc_iou = float(loc_iou)
        self.k = int(worst_per_class)
        self.counts = {c: {**{o: 0 for o in OUTCOMES}, "missed": 0, "gt": 0} for c in self.class_ids}
        labels = [self.names.get(c, str(c)) for c in self.class_ids]
        self.rows = labels + [NONE]
        self.cols = labels + [MISSED]
        self.confusion = np.zeros((len(self.rows), len(self.cols)), dtype=np.int64)
        self._index = {c: i for i, c in enumerate(self.class_ids)}
        self._worst: dict[int, list[_Worst]] = {c: [] for c in self.class_ids}
        self._seq = 0
        self.outcome_rows: list[list[Any]] = []
        self.num_images = 0

    def _name(self, cid: int) -> str:
        return self.names.get(int(cid), str(cid))

    # ------------------------------------------------------------------ one image

    def add(
        self,
        image_id: str,
        width: int,
        height: int,
        gt_boxes: np.ndarray,
        gt_labels: np.ndarray,
        gt_group: np.ndarray,
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_labels: np.ndarray,
        encoded: bytes = b"",
    ) -> None:
        """Analyse one image (pixel boxes ``ymin, xmin, ymax, xmax``)."""
        self.num_images += 1
        gb = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        gl = np.asarray(gt_labels, np.int64).reshape(-1)
        gg = np.asarray(gt_group, bool).reshape(-1)
        keep = np.asarray(det_scores, np.float64).reshape(-1) >= self.min_score
        order = np.argsort(-np.asarray(det_scores, np.float64)[keep], kind="stable")
        db = np.asarray(det_boxes, np.float64).reshape(-1, 4)[keep][order]
        ds = np.asarray(det_scores, np.float64)[keep][order]
        dl = np.asarray(det_labels, np.int64).reshape(-1)[keep][order]
        known = np.isin(dl, self.class_ids)
        db, ds, dl = db[known], ds[known], dl[known]
        iou = iou_matrix(db, gb) if len(gb) and len(db) else np.zeros((len(db), len(gb)))
        ioa = ioa_matrix(db, gb) if len(gb) and len(db) else np.zeros((len(db), len(gb)))
        claimed = np.zeros(len(gb), bool)
        dets: list[dict] = []
        for i in range(len(db)):
            c = int(dl[i])
            same = (gl == c) & ~gg
            same_iou = np.where(same, iou[i], -1.0)
            j = int(same_iou.argmax()) if len(gb) else -1
            best_same = same_iou[j] if j >= 0 else -1.0
            group_hit = (
                np.flatnonzero((gl == c) & gg & (ioa[i] >= self.thr)) if len(gb) else np.zeros(0, np.int64)
            )
            other = np.where(gl != c, iou[i], -1.0) if len(gb) else np.zeros(0)
            gt_label: int | None = None
            if best_same >= self.thr and not claimed[j]:
                outcome, claimed[j], gt_label = "tp", True, c
            elif best_same >= self.thr:
                outcome, gt_label = "duplicate", c
            elif len(group_hit):
                outcome, gt_label = "tp", c
                claimed[group_hit] = True
            elif len(other) and other.max() >= self.thr:
                outcome, gt_label = "wrong_class", int(gl[int(other.argmax())])
            elif best_same >= self.loc_iou:
                outcome, gt_label = "localisation", c
            elif len(other) and other.max() >= self.loc_iou:
                outcome, gt_label = "wrong_class", int(gl[int(other.argmax())])
            else:
                outcome = "background"
            self.counts[c][outcome] += 1
            best_any = float(iou[i].max()) if len(gb) else 0.0
            dets.append(
                {
                    "box": [round(float(v), 2) for v in db[i]],
                    "label": self._name(c),
                    "class_id": c,
                    "score": round(float(ds[i]), 5),
                    "outcome": outcome,
                    "gt_label": None if gt_label is None else self._name(gt_label),
                    "iou": round(best_any, 4),
                }
            )
            self.outcome_rows.append(
                [
                    image_id,
                    self._name(c),
                    f"{ds[i]:.5f}",
                    *(f"{v:.2f}" for v in db[i]),
                    outcome,
                    "" if gt_label is None else self._name(gt_label),
                    f"{best_any:.4f}",
                ]
            )
        missed = []
        for j in range(len(gb)):
            c = int(gl[j])
            if c not in self.counts:
                continue
            self.counts[c]["gt"] += 1
            if not claimed[j]:
                self.counts[c]["missed"] += 1
                missed.append(
                    {
                        "box": [round(float(v), 2) for v in gb[j]],
                        "label": self._name(c),
                        "class_id": c,
                        "group_of": bool(gg[j]),
                    }
                )
                self.outcome_rows.append(
                    [image_id, self._name(c), "", *(f"{v:.2f}" for v in gb[j]), "missed", self._name(c), ""]
                )
        self._confuse(np.where(gg[None, :], ioa, iou), dl, gl, gg)
        record = {
            "image_id": image_id,
            "width": int(width),
            "height": int(height),
            "detections": dets,
            "missed": missed,
            "ground_truth": [
                {"box": [round(float(v), 2) for v in b], "label": self._name(int(lab)), "group_of": bool(g)}
                for b, lab, g in zip(gb, gl, gg)
            ],
        }
        self._keep_worst(image_id, record, encoded, dets, missed)

    def _confuse(self, overlap: np.ndarray, dl: np.ndarray, gl: np.ndarray, gg: np.ndarray) -> None:
        # overlap: IoU with ordinary boxes, IoA with group-of boxes (which take any number of predictions).
        used = np.zeros(overlap.shape[1], bool)
        for i in range(overlap.shape[0]):
            col = self._index[int(dl[i])]
            cand = np.where(used & ~gg, -1.0, overlap[i]) if overlap.shape[1] else np.zeros(0)
            if len(cand) and cand.max() >= self.thr:
                j = int(cand.argmax())
                used[j] = True
                row = self._index.get(int(gl[j]))
                self.confusion[len(self.rows) - 1 if row is None else row, col] += 1
            else:
                self.confusion[len(self.rows) - 1, col] += 1
        for j in np.flatnonzero(~used):
            row = self._index.get(int(gl[j]))
            if row is not None:
                self.confusion[row, len(self.cols) - 1] += 1

    def _keep_worst(
        self, image_id: str, record: dict, encoded: bytes, dets: list[dict], missed: list[dict]
    ) -> None:
        if self.k <= 0:
            return
        for c in self.class_ids:
            errors = sum(1 for d in dets if d["class_id"] == c and d["outcome"] != "tp")
            errors += sum(1 for m in missed if m["class_id"] == c)
            if errors == 0:
                continue
            self._seq += 1
            item = _Worst(errors, -self._seq, image_id, record, encoded)
            heap = self._worst[c]
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    # ------------------------------------------------------------------ results

    def result(self, draw: bool = True) -> dict:
        """The analysis document (JSON-ready): per-class counts, confusion matrix, worst images."""
        per_class = {}
        for c in self.class_ids:
            k = self.counts[c]
            fp = sum(k[r] for r in FP_REASONS)
            per_class[str(c)] = {
                "name": self._name(c),
                **k,
                "fp": fp,
                "precision": round(k["tp"] / (k["tp"] + fp), 5) if k["tp"] + fp else None,
                "recall": round((k["gt"] - k["missed"]) / k["gt"], 5) if k["gt"] else None,
            }
        worst = {}
        for c in self.class_ids:
            items = sorted(self._worst[c], reverse=True)
            worst[str(c)] = [
                {
                    **w.record,
                    "errors": w.errors,
                    "class": self._name(c),
                    **({"image": draw_record(w.record, w.encoded)} if draw and w.encoded else {}),
                }
                for w in items
            ]
        totals = {o: sum(self.counts[c][o] for c in self.class_ids) for o in OUTCOMES + ("missed", "gt")}
        return {
            "min_score": self.min_score,
            "iou_threshold": self.thr,
            "loc_iou": self.loc_iou,
            "num_images": self.num_images,
            "totals": totals,
            "per_class": per_class,
            "confusion": {
                "rows": self.rows,
                "cols": self.cols,
                "matrix": self.confusion.tolist(),
                "note": "rows: ground truth ((none) = background); columns: prediction "
                "((missed) = no prediction); class-agnostic IoU matching",
            },
            "worst_images": worst,
        }

    def outcomes_csv(self) -> str:
        """Every analysed prediction and every missed box, one CSV row each."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            ["ImageID", "label", "score", "ymin", "xmin", "ymax", "xmax", "outcome", "gt_label", "iou"]
        )
        w.writerows(self.outcome_rows)
        return buf.getvalue()


COLORS = {"gt": (40, 180, 60), "missed": (255, 150, 0), "tp": (40, 110, 230), "fp": (220, 30, 40)}


def draw_record(record: dict, encoded: bytes, max_side: int = 360) -> str:
    """A JPEG data URI of the image with ground truth (green; missed orange) and predictions
    (blue = true positive, red = false positive labelled with its reason)."""
    from PIL import Image, ImageDraw

    img = Image.open(io.BytesIO(encoded)).convert("RGB")
    scale = min(1.0, max_side / max(img.width, img.height))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    sx, sy = img.width / max(1, record["width"]), img.height / max(1, record["height"])
    draw = ImageDraw.Draw(img)

    def rect(box: list[float], color: tuple[int, int, int], width: int, text: str) -> None:
        y0, x0, y1, x1 = box
        xy = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        draw.rectangle(xy, outline=color, width=width)
        if text:
            tw = draw.textlength(text)
            top = max(0.0, xy[1] - 11)
            draw.rectangle([xy[0], top, xy[0] + tw + 3, top + 11], fill=color)
            draw.text((xy[0] + 1, top - 1), text, fill="white")

    missed = {tuple(m["box"]) for m in record["missed"]}
    for g in record["ground_truth"]:
        gone = tuple(g["box"]) in missed
        rect(g["box"], COLORS["missed" if gone else "gt"], 2, ("missed " if gone else "") + g["label"])
    for d in record["detections"]:
        ok = d["outcome"] == "tp"
        rect(
            d["box"],
            COLORS["tp" if ok else "fp"],
            2,
            f"{d['label']} {d['score']:.2f}" + ("" if ok else f" {d['outcome']}"),
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
