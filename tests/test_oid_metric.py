"""The Open Images metric against hand-computed cases, and the COCO wrapper against pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from openimages_od.training.box_ops import iou_matrix
from openimages_od.training.oid_metric import (
    ImageDetections,
    ImageGroundTruth,
    OpenImagesMetric,
    average_precision,
    hierarchy_from_json,
)

VEHICLE, CAR, BALL = 1, 2, 3
TREE = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {
            "LabelName": "/m/veh",
            "Subcategory": [{"LabelName": "/m/car"}],
            "Part": [{"LabelName": "/m/wheel"}],
        },
        {"LabelName": "/m/ball"},
    ],
}
MIDS = {"/m/veh": VEHICLE, "/m/car": CAR, "/m/ball": BALL}


def gt(boxes, labels, group=None, pos=None, neg=None) -> ImageGroundTruth:
    return ImageGroundTruth(np.array(boxes, float).reshape(-1, 4), labels, group, pos, neg)


def det(boxes, scores, labels) -> ImageDetections:
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), scores, labels)


def test_iou_and_ap_basics():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [0, 5, 10, 15], [20, 20, 30, 30]], float)
    assert np.allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]])
    assert math.isnan(average_precision(np.array([0.5]), np.array([True]), 0))
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0


def test_duplicate_detection_is_false_positive():
    # GT1, GT2; det 0.9 on GT1 (TP), 0.8 on GT1 again (FP: already claimed), 0.7 on GT2 (TP).
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 0.5*1 + 0.5*(2/3).
    m = OpenImagesMetric([BALL])
    m.add_image(
        gt([[0, 0, 10, 10], [20, 20, 30, 30]], [BALL, BALL]),
        det([[0, 0, 10, 10], [0, 1, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [BALL] * 3),
    )
    r = m.result()
    assert r["per_class"][BALL]["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r["per_class"][BALL]["num_gt"] == 2


def test_group_of_counts_once_with_max_score_and_never_penalises():
    # A group-of box (0..10) and a normal box (20..30). Two detections inside the group box
    # (0.9, 0.6) count as ONE true positive scored 0.9; 0.8 hits the normal box; 0.7 is a miss.
    # Ranked: 0.9 TP, 0.8 TP, 0.7 FP; 2 ground-truth instances -> AP 1.0.
    g = gt([[0, 0, 10, 10], [20, 20, 30, 30]], [BALL, BALL], group=[True, False])
    d = det(
        [[0, 0, 5, 5], [5, 5, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.6, 0.8, 0.7], [BALL] * 4
    )
    m = OpenImagesMetric([BALL])
    m.add_image(g, d)
    r = m.result()["per_class"][BALL]
    assert r["ap"] == pytest.approx(1.0)
    assert r["num_detections"] == 3  # two group hits collapsed into one
    # Treating the same boxes as ordinary boxes punishes the in-group detections.
    m2 = OpenImagesMetric([BALL])
    m2.add_image(gt([[0, 0, 10, 10], [20, 20, 30, 30]], [BALL, BALL]), d)
    assert m2.result()["per_class"][BALL]["ap"] < 0.8


def test_group_of_box_without_detection_is_a_miss():
    # The group-of box is one ground-truth instance: undetected, recall stops at 1/2.
    m = OpenImagesMetric([BALL])
    m.add_image(
        gt([[0, 0, 10, 10], [20, 20, 30, 30]], [BALL, BALL], group=[True, False]),
        det([[20, 20, 30, 30]], [0.9], [BALL]),
    )
    assert m.result()["per_class"][BALL]["ap"] == pytest.approx(0.5)


def test_hierarchy_expands_ground_truth_and_detections():
    h = hierarchy_from_json(TREE, MIDS)
    assert h.ancestors == {CAR: {VEHICLE}}
    assert h.descendants == {VEHICLE: {CAR}}
    # A Car box detected as Car: with the hierarchy, Vehicle is scored too (both AP 1).
    m = OpenImagesMetric([VEHICLE, CAR, BALL], h)
    m.add_image(gt([[0, 0, 10, 10]], [CAR]), det([[0, 0, 10, 10]], [0.9], [CAR]))
    r = m.result()
    assert r["per_class"][VEHICLE]["ap"] == pytest.approx(1.0)
    assert r["per_class"][CAR]["ap"] == pytest.approx(1.0)
    assert r["per_class"][BALL]["ap"] is None  # no ground truth: not scored
    assert r["num_classes_scored"] == 2 and r["mAP"] == pytest.approx(1.0)
    # Without the hierarchy Vehicle has no ground truth.
    m = OpenImagesMetric([VEHICLE, CAR], None)
    m.add_image(gt([[0, 0, 10, 10]], [CAR]), det([[0, 0, 10, 10]], [0.9], [CAR]))
    assert m.result()["per_class"][VEHICLE]["ap"] is None
    # A "Vehicle" detection on a Car box: right for Vehicle, a miss for Car.
    m = OpenImagesMetric([VEHICLE, CAR], h)
    m.add_image(gt([[0, 0, 10, 10]], [CAR]), det([[0, 0, 10, 10]], [0.9], [VEHICLE]))
    r = m.result()["per_class"]
    assert r[VEHICLE]["ap"] == pytest.approx(1.0) and r[CAR]["ap"] == pytest.approx(0.0)


def test_already_expanded_ground_truth_is_not_doubled():
    h = hierarchy_from_json(TREE, MIDS)
    m = OpenImagesMetric([VEHICLE, CAR], h)
    m.add_image(gt([[0, 0, 10, 10], [0, 0, 10, 10]], [CAR, VEHICLE]), det([[0, 0, 10, 10]], [0.9], [CAR]))
    assert m.result()["per_class"][VEHICLE]["num_gt"] == 1


def test_verified_labels_decide_where_a_class_is_scored():
    # Car: image 1 verified only Ball (a Car detection there is ignored), image 2 verified
    # no Car (its Car detection is a false positive), image 3 has a Car box found at 0.5.
    # Ranked: 0.8 FP, 0.5 TP -> AP 0.5. Without image labels (the challenge rule) only box classes
    # are scored: images 1 and 2 have no Car box, so both Car detections are ignored -> AP 1.
    imgs = [
        (gt([[0, 0, 10, 10]], [BALL], pos={BALL}, neg=set()), det([[50, 50, 60, 60]], [0.9], [CAR])),
        (gt(np.zeros((0, 4)), [], pos=set(), neg={CAR}), det([[50, 50, 60, 60]], [0.8], [CAR])),
        (gt([[0, 0, 10, 10]], [CAR], pos={CAR}, neg=set()), det([[0, 0, 10, 10]], [0.5], [CAR])),
    ]
    m = OpenImagesMetric([CAR])
    for g, d in imgs:
        m.add_image(g, d)
    assert m.result()["per_class"][CAR]["ap"] == pytest.approx(0.5)
    m = OpenImagesMetric([CAR])
    for g, d in imgs:
        m.add_image(gt(g.boxes, g.labels), d)
    assert m.result()["per_class"][CAR]["ap"] == pytest.approx(1.0)


def test_negative_label_goes_down_the_hierarchy():
    # "No vehicle here" means no car either: a Car detection on that image is a false positive.
    h = hierarchy_from_json(TREE, MIDS)
    m = OpenImagesMetric([CAR], h)
    m.add_image(gt(np.zeros((0, 4)), [], pos=set(), neg={VEHICLE}), det([[0, 0, 5, 5]], [0.9], [CAR]))
    m.add_image(gt([[0, 0, 10, 10]], [CAR], pos={CAR}, neg=set()), det([[0, 0, 10, 10]], [0.5], [CAR]))
    assert m.result()["per_class"][CAR]["ap"] == pytest.approx(0.5)


def _random_case(rng: np.random.Generator, n_images: int = 12):
    images = []
    for _ in range(n_images):
        w, h = int(rng.integers(80, 200)), int(rng.integers(80, 200))
        k = int(rng.integers(0, 5))
        y0, x0 = rng.uniform(0, h * 0.6, k), rng.uniform(0, w * 0.6, k)
        gb = (
            np.stack([y0, x0, y0 + rng.uniform(10, h * 0.4, k), x0 + rng.uniform(10, w * 0.4, k)], 1)
            if k
            else np.zeros((0, 4))
        )
        gl = rng.integers(1, 4, k)
        crowd = rng.random(k) < 0.15
        # detections: jittered ground truth plus random boxes
        jit = gb + rng.normal(0, 4, gb.shape) if k else np.zeros((0, 4))
        m = int(rng.integers(0, 4))
        ry, rx = rng.uniform(0, h * 0.7, m), rng.uniform(0, w * 0.7, m)
        rb = (
            np.stack([ry, rx, ry + rng.uniform(5, h * 0.3, m), rx + rng.uniform(5, w * 0.3, m)], 1)
            if m
            else np.zeros((0, 4))
        )
        db = np.concatenate([jit, rb])
        dl = np.concatenate([np.where(rng.random(k) < 0.8, gl, rng.integers(1, 4, k)), rng.integers(1, 4, m)])
        ds = rng.uniform(0.05, 1.0, len(db))
        images.append((w, h, gb, gl, crowd, db, ds, dl))
    return images


def test_coco_wrapper_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from openimages_od.training.coco_metric import COCO_STAT_NAMES, CocoAccumulator

    images = _random_case(np.random.default_rng(7))
    acc = CocoAccumulator([1, 2, 3])
    for im in images:
        acc.add_image(*im)
    ours = acc.result()

    # Independent route: COCO JSON files on disk and a list of result dicts.
    gt_json = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    results = []
    for i, (w, h, gb, gl, crowd, db, ds, dl) in enumerate(images, start=1):
        gt_json["images"].append({"id": i, "width": w, "height": h})
        for b, label, c in zip(gb, gl, crowd):
            bw, bh = b[3] - b[1], b[2] - b[0]
            gt_json["annotations"].append(
                {
                    "id": len(gt_json["annotations"]) + 1,
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": [b[1], b[0], bw, bh],
                    "area": bw * bh,
                    "iscrowd": int(c),
                }
            )
        for b, s, label in zip(db, ds, dl):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(label),
                    "score": float(s),
                    "bbox": [b[1], b[0], b[3] - b[1], b[2] - b[0]],
                }
            )
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt_json))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for name, ref in zip(COCO_STAT_NAMES, ev.stats):
        assert ours[name] == pytest.approx(ref, abs=1e-4), name
    assert 0 < ours["AP50"] <= 1


def test_coco_perfect_detections_score_one():
    from openimages_od.training.coco_metric import CocoAccumulator

    acc = CocoAccumulator([1])
    boxes = np.array([[10, 10, 60, 80], [100, 20, 150, 90]], float)
    acc.add_image(200, 200, boxes, [1, 1], None, boxes, [0.9, 0.8], [1, 1])
    assert acc.result()["AP"] == pytest.approx(1.0)


def test_pr_curve_follows_score_order_and_matches_ap_endpoints():
    from openimages_od.training.oid_metric import average_precision, pr_curve

    scores = np.array([0.9, 0.1, 0.8, 0.3])
    tp = np.array([True, False, False, True])
    c = pr_curve(scores, tp, num_gt=3)
    # ranked: 0.9 TP, 0.8 FP, 0.3 TP, 0.1 FP
    assert c["precision"] == [1.0, 0.5, pytest.approx(2 / 3, abs=1e-5), 0.5]
    assert c["recall"] == [
        pytest.approx(1 / 3, abs=1e-5),
        pytest.approx(1 / 3, abs=1e-5),
        pytest.approx(2 / 3, abs=1e-5),
        pytest.approx(2 / 3, abs=1e-5),
    ]
    assert average_precision(scores, tp, 3) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    assert pr_curve(scores, tp, num_gt=0) is None
    big = pr_curve(np.linspace(1, 0, 5000), np.ones(5000, dtype=bool), num_gt=5000, max_points=50)
    assert len(big["recall"]) <= 50 and big["recall"][-1] == 1.0


# --------------------------------------------------------------------------- issue 15: the three defects


def _shard_example(is_group_of: int, raw_group_of: bool = False) -> bytes:
    """A real shard record (the pipeline's TF-free writer) with one 10x10 Ball box of the given IsGroupOf.

    ``raw_group_of`` writes the plan's value as is into ``image/object/group_of`` (and ``is_crowd``),
    as shards written before the writer mapped -1 to 0 did.
    """
    from openimages_od.pipeline.example import IntF, detection_features, encode_example

    row = {
        "image_id": "00000000000000aa",
        "source_id": 7,
        "boxes": [
            {
                "label_id": BALL,
                "mid": "/m/ball",
                "is_group_of": is_group_of,
                "is_occluded": -1,
                "is_truncated": -1,
                "is_depiction": -1,
            }
        ],
        "image_labels": [],
    }
    feats = detection_features(row, b"jpeg", 100, 100, [(0.0, 0.1, 0.0, 0.1)], "0" * 64)
    assert feats["image/object/group_of"] == (1 if is_group_of == 1 else 0,)
    if raw_group_of:
        feats["image/object/group_of"] = IntF([is_group_of])
        feats["image/object/is_crowd"] = IntF([is_group_of])
    return encode_example(feats)


@pytest.mark.parametrize("is_group_of,raw", [(-1, False), (-1, True), (0, False)])
def test_unknown_group_of_is_not_group_of_end_to_end(is_group_of, raw):
    """Acceptance 1: ground truth with group_of -1 is an ordinary box.

    Box 0..10 x 0..10, one detection 0..6 x 0..6: IoU 36/100 = 0.36 < 0.5, a false positive,
    so AP 0 (as a group-of box it would be inside it, IoA 1, and score AP 1). COCO AP is
    computed (0.0), not -1 for "no ground truth".
    """
    from openimages_od.training.coco_metric import CocoAccumulator
    from openimages_od.training.scoring import parse_ground_truth

    g = parse_ground_truth(_shard_example(is_group_of, raw))
    assert g.group_of.tolist() == [False] and g.positive is None and g.source_id == 7
    d = det([[0, 0, 6, 6]], [0.9], [BALL])
    m = OpenImagesMetric([BALL])
    m.add_image(ImageGroundTruth(g.boxes, g.labels, g.group_of), d)
    assert iou_matrix(d.boxes, g.boxes)[0, 0] == pytest.approx(0.36)
    assert m.result()["mAP"] == 0.0
    acc = CocoAccumulator([BALL])
    acc.add_image(g.width, g.height, g.boxes, g.labels, g.group_of, d.boxes, d.scores, d.labels)
    assert acc.result()["AP"] == 0.0
    # The raw attribute array (-1) handed straight to the metric and COCO is read the same way.
    m2 = OpenImagesMetric([BALL])
    m2.add_image(ImageGroundTruth(g.boxes, g.labels, np.array([is_group_of])), d)
    assert m2.result()["mAP"] == 0.0
    acc2 = CocoAccumulator([BALL])
    acc2.add_image(100, 100, g.boxes, g.labels, np.array([is_group_of]), d.boxes, d.scores, d.labels)
    assert acc2.result()["AP"] == 0.0


def test_group_of_one_is_still_group_of_end_to_end():
    from openimages_od.training.scoring import parse_ground_truth

    g = parse_ground_truth(_shard_example(1))
    assert g.group_of.tolist() == [True]
    m = OpenImagesMetric([BALL])
    m.add_image(ImageGroundTruth(g.boxes, g.labels, g.group_of), det([[0, 0, 6, 6]], [0.9], [BALL]))
    assert m.result()["mAP"] == 1.0  # inside the group-of box: IoA 1


def test_image_without_image_labels_is_scored_on_its_box_classes_only():
    """Acceptance 2. Image A has no image-level labels and one Ball box; image B verifies Car.

    A: Ball 0.9 on the Ball box (TP), Car 0.8 on background -> ignored (Car is not a box class of A).
    B: Car 0.7 on its Car box (TP). Car AP = 1 (if A were scored on every class: 0.8 FP, 0.7 TP -> 0.5).
    """
    m = OpenImagesMetric([CAR, BALL])
    m.add_image(
        gt([[0, 0, 10, 10]], [BALL]), det([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [BALL, CAR])
    )
    m.add_image(gt([[0, 0, 10, 10]], [CAR], pos={CAR}, neg=set()), det([[0, 0, 10, 10]], [0.7], [CAR]))
    r = m.result()["per_class"]
    assert r[CAR]["ap"] == pytest.approx(1.0) and r[CAR]["num_detections"] == 1
    assert r[BALL]["ap"] == pytest.approx(1.0)


def test_verified_absent_label_without_boxes_scores_false_positives():
    # Verified absent (confidence 0) makes the class evaluable: a detection there is a FP.
    m = OpenImagesMetric([CAR])
    m.add_image(gt(np.zeros((0, 4)), [], pos=set(), neg={CAR}), det([[0, 0, 5, 5]], [0.9], [CAR]))
    m.add_image(gt([[0, 0, 10, 10]], [CAR]), det([[0, 0, 10, 10]], [0.5], [CAR]))
    assert m.result()["per_class"][CAR]["ap"] == pytest.approx(0.5)


def test_invalid_detection_boxes_are_dropped():
    m = OpenImagesMetric([BALL])
    m.add_image(gt([[0, 0, 10, 10]], [BALL]), det([[5, 5, 5, 9], [0, 0, 10, 10]], [0.9, 0.5], [BALL, BALL]))
    r = m.result()["per_class"][BALL]
    assert r["ap"] == pytest.approx(1.0) and r["num_detections"] == 1


# --------------------------------------------------------------------------- parity with TF OD API's semantics
# Cases rebuilt from the examples in TF OD API's object_detection_evaluation_test.py
# (OpenImagesChallengeEvaluatorTest and OpenImagesV2EvaluationTest); expected numbers worked out by hand
# below, and equal to the figures that test asserts. Classes there: 1 cat, 2 dog, 3 elephant.

CAT, DOG, ELEPHANT = 1, 2, 3


def _challenge_case(group_of_weight: float) -> OpenImagesMetric:
    m = OpenImagesMetric([CAT, DOG, ELEPHANT], group_of_weight=group_of_weight)
    # img1: verified labels {cat, dog, elephant}; cat, elephant, cat(group) boxes; two dog detections.
    m.add_image(
        gt(
            [[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]],
            [CAT, ELEPHANT, CAT],
            group=[False, False, True],
            pos={CAT, DOG, ELEPHANT},
        ),
        det([[10, 10, 11, 11], [100, 100, 120, 120]], [0.7, 0.8], [DOG, DOG]),
    )
    # img2: no image-level labels -> evaluable {cat, elephant}; the dog detection is ignored.
    m.add_image(
        gt(
            [[10, 10, 11, 11], [500, 500, 510, 510], [10, 10, 12, 12]],
            [CAT, CAT, ELEPHANT],
            group=[False, False, True],
        ),
        det(
            [[10, 10, 11, 11], [100, 100, 120, 120], [100, 100, 220, 220], [10, 10, 11, 11]],
            [0.7, 0.8, 0.5, 0.9],
            [CAT, CAT, DOG, ELEPHANT],
        ),
    )
    # img3: one dog box, found.
    m.add_image(gt([[0, 0, 1, 1]], [DOG]), det([[0, 0, 1, 1]], [0.5], [DOG]))
    return m


def test_parity_challenge_evaluator_group_of_weight_half():
    """OpenImagesChallengeEvaluator(group_of_weight=0.5) on its documented example.

    cat: ground truth 1 + 0.5 (img1 group) + 2 (img2) = 3.5; detections (img2) 0.8 FP, 0.7 TP
         -> precision 1/2 at recall 1/3.5 -> AP 1/7.
    dog: ground truth 1 (img3); img1's 0.8 and 0.7 are FPs (dog verified there), img2's is ignored,
         img3's 0.5 TP -> precision 1/3 at recall 1 -> AP 1/3.
    elephant: ground truth 1 + 0.5 = 1.5; img2's 0.9 lies inside the group-of box (IoA 1):
         a 0.5-weight TP with no FP -> precision 1 at recall 0.5/1.5 -> AP 1/3.
    mAP = (1/7 + 1/3 + 1/3) / 3 = 17/63 = 0.269841...
    """
    r = _challenge_case(0.5).result()
    assert r["per_class"][CAT]["ap"] == pytest.approx(1 / 7)
    assert r["per_class"][DOG]["ap"] == pytest.approx(1 / 3)
    assert r["per_class"][ELEPHANT]["ap"] == pytest.approx(1 / 3)
    assert r["mAP"] == pytest.approx(17 / 63) and round(r["mAP"], 9) == 0.269841270
    assert r["per_class"][CAT]["num_gt"] == pytest.approx(3.5)


def test_parity_challenge_evaluator_default_weight():
    """The same case at the challenge default (weight 1).

    cat: ground truth 1 + 1 + 2 = 4; 0.8 FP, 0.7 TP -> AP (1/4) * (1/2) = 1/8.
    dog: unchanged, 1/3.  elephant: ground truth 2; 0.9 a full TP -> AP 1/2.
    mAP = (1/8 + 1/3 + 1/2) / 3 = 23/72.
    """
    r = _challenge_case(1.0).result()
    assert r["per_class"][CAT]["ap"] == pytest.approx(1 / 8)
    assert r["per_class"][DOG]["ap"] == pytest.approx(1 / 3)
    assert r["per_class"][ELEPHANT]["ap"] == pytest.approx(1 / 2)
    assert r["mAP"] == pytest.approx(23 / 72)


def test_parity_v2_protocol_group_of_weight_zero():
    """OpenImagesDetectionEvaluator (V2, group-of weight 0) on its documented example.

    img1: cat, elephant, cat boxes; img2: cat, cat(group), elephant; img3: dog. Detections on img2 only:
    cat 0.7 on the cat box (TP), cat 0.8 on background (FP), elephant 0.9 on background (FP).
    cat: ground truth 2 + 1 (the group-of box weighs 0) = 3 -> AP (1/3)(1/2) = 1/6.
    elephant: 2 boxes, one FP -> AP 0.  dog: AP 0.  mAP = 1/18 (0.0555...).
    Every detection is on a box class of img2, so the challenge's label rule changes nothing here.
    """
    m = OpenImagesMetric([CAT, DOG, ELEPHANT], group_of_weight=0.0)
    m.add_image(gt([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]], [CAT, ELEPHANT, CAT]), det([], [], []))
    m.add_image(
        gt(
            [[10, 10, 11, 11], [500, 500, 510, 510], [10, 10, 12, 12]],
            [CAT, CAT, ELEPHANT],
            group=[False, True, False],
        ),
        det(
            [[10, 10, 11, 11], [100, 100, 120, 120], [100, 100, 220, 220]],
            [0.7, 0.8, 0.9],
            [CAT, CAT, ELEPHANT],
        ),
    )
    m.add_image(gt([[0, 0, 1, 1]], [DOG]), det([], [], []))
    r = m.result()
    assert r["per_class"][CAT]["ap"] == pytest.approx(1 / 6)
    assert r["per_class"][ELEPHANT]["ap"] == 0.0 and r["per_class"][DOG]["ap"] == 0.0
    assert r["mAP"] == pytest.approx(1 / 18)


def test_group_of_weight_zero_ignores_detections_inside_group_boxes():
    # Weight 0: the detection inside the group-of box is neither TP nor FP; the group box is no ground truth.
    m = OpenImagesMetric([BALL], group_of_weight=0.0)
    m.add_image(
        gt([[0, 0, 10, 10], [20, 20, 30, 30]], [BALL, BALL], group=[True, False]),
        det([[0, 0, 5, 5], [20, 20, 30, 30]], [0.9, 0.8], [BALL, BALL]),
    )
    r = m.result()["per_class"][BALL]
    assert r["ap"] == pytest.approx(1.0) and r["num_gt"] == 1 and r["num_detections"] == 1
