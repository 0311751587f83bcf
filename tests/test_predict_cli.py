"""`oiod predict` / `oiod evaluate --predictions`: argument errors exit 2 with a message, before any model loads;
prediction files are parsed strictly."""

from __future__ import annotations

import numpy as np
import pytest

from openimages_od.cli import main
from openimages_od.errors import DataError
from openimages_od.openimages.ids import source_id
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.training.predictions import ImagePrediction, challenge_csv, coco_json, read_predictions

LM = LabelMap.from_mids(["/m/018xm", "/m/0k4j"], {"/m/018xm": "Ball", "/m/0k4j": "Car"})
IMAGES = {"00000000000000aa": (200, 100, source_id("00000000000000aa"))}


def test_predict_argument_errors_exit_2(tmp_path, capsys):
    out = f"output.url={tmp_path}/out"
    assert main(["predict", "--set", out, "--model", "m", "--checkpoint", "c"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["predict", "--set", out, "--split", "validation", "--images", "a.jpg"]) == 2
    assert main(["evaluate", "--set", out, "--predictions", "p.csv", "--continuous"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_written_files_read_back_to_the_same_pixels():
    p = ImagePrediction(
        "00000000000000aa",
        source_id("00000000000000aa"),
        200,
        100,
        np.array([[0.1, 0.2, 0.5, 0.7]], np.float32),
        np.array([0.8765], np.float32),
        np.array([2]),
    )
    # What `oiod evaluate` computes: the model's float32 coordinates, in float64, times the image size.
    f = lambda v: float(np.float32(v))  # noqa: E731
    want = np.array([[f(0.1) * 100, f(0.2) * 200, f(0.5) * 100, f(0.7) * 200]])
    for text, name in ((challenge_csv([p], LM), "p.csv"), (coco_json([p], LM), "p.json")):
        got = read_predictions(text, name, LM, IMAGES)
        boxes, scores, labels = got.get("00000000000000aa")
        np.testing.assert_allclose(boxes, want, rtol=0, atol=1e-9)
        assert scores.tolist() == [float(np.float32(0.8765))] and labels.tolist() == [2]
    assert challenge_csv([p], LM).splitlines()[1].startswith("00000000000000aa,/m/0k4j,")


def test_unknown_images_and_classes_are_counted_not_scored():
    text = (
        "ImageID,LabelName,Score,XMin,XMax,YMin,YMax\n00000000000000aa,/m/018xm,0.9,0,1,0,1\n"
        "00000000000000bb,/m/018xm,0.9,0,1,0,1\n00000000000000aa,/m/zzz,0.9,0,1,0,1\n"
    )
    got = read_predictions(text, "p.csv", LM, IMAGES)
    assert (got.num_read, got.unknown_images, got.unknown_labels) == (3, 1, 1)
    assert got.get("00000000000000aa")[0].tolist() == [[0.0, 0.0, 100.0, 200.0]]


@pytest.mark.parametrize(
    "text,message",
    [
        ("ImageID,Score\n", "missing column"),
        (
            "ImageID,LabelName,Score,XMin,XMax,YMin,YMax\n00000000000000aa,/m/018xm,x,0,1,0,1\n",
            "p.csv: line 2",
        ),
        ('[{"image_id": 1, "bbox": [1, 2]}]', "entry 0"),
        ("[{", "not valid JSON"),
    ],
)
def test_malformed_prediction_files_name_where(text, message):
    with pytest.raises(DataError, match=message):
        read_predictions(text, "p.json" if text.startswith("[") else "p.csv", LM, IMAGES)
