"""Error analysis: every prediction's outcome, misses and the confusion matrix on a hand-built image."""

from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image

from openimages_od.training.analysis import ErrorAnalysis

BALL, CAR = 1, 2


def _jpeg(w: int = 320, h: int = 320) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 130, 140)).save(buf, format="JPEG")
    return buf.getvalue()


def analysed() -> ErrorAnalysis:
    a = ErrorAnalysis([BALL, CAR], {BALL: "Ball", CAR: "Car"}, min_score=0.3)
    gt_boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [100, 100, 200, 200]]
    gt_labels = [BALL, BALL, CAR, BALL]
    group = [False, False, False, True]
    dets = [
        ([0, 0, 10, 10], 0.9, BALL),  # TP
        ([0, 0, 10, 10], 0.8, BALL),  # duplicate of the same ball
        ([50, 50, 60, 60], 0.7, BALL),  # wrong class: on the car
        ([20, 20, 26, 26], 0.6, BALL),  # localisation: IoU 36/100 with the second ball
        ([300, 300, 310, 310], 0.5, BALL),  # background
        ([110, 110, 120, 120], 0.4, BALL),  # inside the group-of box: TP
        ([50, 50, 60, 60], 0.2, CAR),
    ]  # below min_score: not analysed
    a.add(
        "img1",
        320,
        320,
        np.array(gt_boxes, float),
        np.array(gt_labels),
        np.array(group),
        np.array([d[0] for d in dets], float),
        np.array([d[1] for d in dets]),
        np.array([d[2] for d in dets]),
        _jpeg(),
    )
    return a


def test_outcomes_misses_and_confusion_by_hand():
    a = analysed()
    r = a.result()
    ball, car = r["per_class"]["1"], r["per_class"]["2"]
    assert {
        k: ball[k] for k in ("tp", "duplicate", "wrong_class", "localisation", "background", "missed", "gt")
    } == {"tp": 2, "duplicate": 1, "wrong_class": 1, "localisation": 1, "background": 1, "missed": 1, "gt": 3}
    assert ball["fp"] == 4 and ball["precision"] == round(2 / 6, 5) and ball["recall"] == round(2 / 3, 5)
    assert car["gt"] == 1 and car["missed"] == 1 and car["tp"] == 0 and car["recall"] == 0.0
    # rows: ground truth Ball, Car, (none); cols: predicted Ball, Car, (missed)
    assert r["confusion"]["rows"] == ["Ball", "Car", "(none)"]
    assert r["confusion"]["cols"] == ["Ball", "Car", "(missed)"]
    # The car was taken for a ball (0.7): class-agnostic matching pairs them, so it is confused, not missed.
    assert r["confusion"]["matrix"] == [[2, 0, 1], [1, 0, 0], [3, 0, 0]]
    rows = list(csv.DictReader(io.StringIO(a.outcomes_csv())))
    assert [x["outcome"] for x in rows] == [
        "tp",
        "duplicate",
        "wrong_class",
        "localisation",
        "background",
        "tp",
        "missed",
        "missed",
    ]
    assert rows[2]["gt_label"] == "Car" and rows[6]["label"] == "Ball" and rows[7]["label"] == "Car"
    worst = r["worst_images"]
    assert [w["errors"] for w in worst["1"]] == [5] and [w["errors"] for w in worst["2"]] == [1]
    assert worst["1"][0]["image"].startswith("data:image/jpeg;base64,")


def test_worst_images_keep_the_k_worst():
    a = ErrorAnalysis([BALL], {BALL: "Ball"}, min_score=0.0, worst_per_class=2)
    for i, n_fp in enumerate([1, 4, 2, 3]):
        boxes = np.array([[300 + 5 * k, 300, 302 + 5 * k, 302] for k in range(n_fp)], float)
        a.add(
            f"img{i}",
            400,
            400,
            np.zeros((0, 4)),
            np.zeros(0, int),
            np.zeros(0, bool),
            boxes,
            np.full(n_fp, 0.9),
            np.full(n_fp, BALL),
        )
    worst = a.result(draw=False)["worst_images"]["1"]
    assert [(w["image_id"], w["errors"]) for w in worst] == [("img1", 4), ("img3", 3)]


def test_wrong_class_and_off_box_is_a_class_error_not_background():
    # A Car prediction overlapping only a Ball box by IoU 36/100 (TIDE's "both"): wrong class, not background.
    a = ErrorAnalysis([BALL, CAR], {BALL: "Ball", CAR: "Car"}, min_score=0.0)
    a.add(
        "img",
        100,
        100,
        np.array([[0, 0, 10, 10]], float),
        np.array([BALL]),
        np.array([False]),
        np.array([[0, 0, 6, 6], [50, 50, 60, 60]], float),
        np.array([0.9, 0.8]),
        np.array([CAR, CAR]),
    )
    car = a.result(draw=False)["per_class"]["2"]
    assert (car["wrong_class"], car["background"], car["localisation"]) == (1, 1, 0)
