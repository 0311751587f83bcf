"""The HTML report on partial outputs: every section degrades to a note, eval charts appear from metrics."""

from __future__ import annotations

import json

import pytest

from openimages_od.config import load_config
from openimages_od.openimages.labelmap import LabelMap
from openimages_od.report import build_report, run_report


def test_report_without_any_outputs_says_what_to_run(tmp_path):
    cfg = load_config(None, [f"output.url={tmp_path}/out"])
    html = build_report(cfg)
    for hint in ("oiod plan", "oiod prepare", "No committed shards", "oiod evaluate"):
        assert hint in html


def test_report_eval_section_has_ap_bars_and_pr_curves(tmp_path):
    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    lm = LabelMap.from_mids(["/m/018xm", "/m/0d4v4"], {"/m/018xm": "Ball", "/m/0d4v4": "Window"})
    (out / "label_map.pbtxt").write_text(lm.to_pbtxt())
    curve = {"recall": [0.2, 0.5, 0.9], "precision": [1.0, 0.9, 0.6]}
    metrics = {
        "step": 40,
        "coco": {"AP": 0.41, "AP50": 0.77},
        "openimages": {
            "mAP": 0.7,
            "per_class": {
                "1": {"ap": 0.8, "name": "Ball", "pr_curve": curve},
                "2": {"ap": 0.6, "name": "Window", "pr_curve": None},
            },
        },
    }
    (out / "eval" / "metrics-40.json").write_text(json.dumps(metrics))
    (out / "eval" / "metrics-7.json").write_text(json.dumps({**metrics, "step": 7, "coco": {"AP": 0.0}}))
    cfg = load_config(None, [f"output.url={out}"])
    url = run_report(cfg)
    html = (out / "report.html").read_text()
    assert url.endswith("report.html")
    assert "metrics-40.json" in html  # the latest step, not the last listed
    assert 'alt="per-class AP"' in html and 'alt="precision-recall curves"' in html
    assert "0.7700" in html


def _report_with_analysis(tmp_path):
    """An output folder with a plan-less class count, metrics and the analysis of a hand-built image."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis import analysed

    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    lm = LabelMap.from_mids(["/m/018xm", "/m/0k4j"], {"/m/018xm": "Ball", "/m/0k4j": "Car"})
    (out / "label_map.pbtxt").write_text(lm.to_pbtxt())
    metrics = {
        "step": 12,
        "coco": {"AP": 0.3},
        "openimages": {
            "mAP": 0.45,
            "per_class": {
                "1": {"ap": 0.6, "name": "Ball", "pr_curve": None},
                "2": {"ap": 0.3, "name": "Car", "pr_curve": None},
            },
        },
    }
    (out / "eval" / "metrics-12.json").write_text(json.dumps(metrics))
    (out / "eval" / "analysis-12.json").write_text(json.dumps(analysed().result()))
    return load_config(None, [f"output.url={out}"]), out


def test_report_shows_error_analysis_and_confusion_matrix(tmp_path):
    cfg, _out = _report_with_analysis(tmp_path)
    html = build_report(cfg)
    assert "id='errors'" in html and "id='confusion-matrix'" in html and "id='worst-images'" in html
    assert "outcomes-12.csv" in html
    assert "<th>(none)</th>" in html and "<th>(missed)</th>" in html
    assert html.count("data:image/jpeg;base64,") >= 2  # the worst image of Ball and of Car


@pytest.mark.browser
def test_report_error_analysis_in_headless_chromium(tmp_path):
    """Acceptance 5: the report's error analysis and confusion matrix render, images load, no console errors."""
    from browser_helpers import chromium_driver, console_errors
    from selenium.webdriver.common.by import By

    cfg, out = _report_with_analysis(tmp_path)
    run_report(cfg)
    with chromium_driver() as driver:
        driver.get((out / "report.html").as_uri())
        cells = driver.find_elements(By.CSS_SELECTOR, "#confusion-matrix tbody tr")
        assert [r.find_element(By.TAG_NAME, "th").text for r in cells] == ["Ball", "Car", "(none)"]
        assert [c.text for c in cells[0].find_elements(By.TAG_NAME, "td")] == ["2", "0", "1"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#error-table tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["Ball", "Car", "all"]
        assert [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")][2:9] == [
            "2",
            "4",
            "1",
            "1",
            "1",
            "1",
            "1",
        ]
        imgs = driver.find_elements(By.CSS_SELECTOR, "#worst-images img")
        assert len(imgs) == 2
        assert all(
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in imgs
        )
        assert console_errors(driver) == []


def test_report_samples_mark_group_of_only_when_one(tmp_path):
    """Unknown group_of (-1, every V2 train box) is not drawn as "(group)"; 1 is."""
    import io

    from PIL import Image

    from openimages_od.pipeline.example import IntF, detection_features, encode_example
    from openimages_od.pipeline.tfrecord import encode_records
    from openimages_od.report_data import ReportData
    from openimages_od.storage_setup import storage_from_config

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(buf, format="JPEG")
    recs = []
    for i, g in enumerate((-1, 0, 1)):
        row = {
            "image_id": f"{i:016x}",
            "source_id": i + 1,
            "image_labels": [],
            "boxes": [{"label_id": 1, "mid": "/m/018xm", "is_group_of": g}],
        }
        feats = detection_features(row, buf.getvalue(), 64, 48, [(0.1, 0.5, 0.1, 0.5)], "0" * 64)
        if g == -1:  # as shards written before the writer mapped unknown to 0
            feats["image/object/group_of"] = IntF([-1])
        recs.append(encode_example(feats))
    d = tmp_path / "out" / "tfrecords" / "validation"
    d.mkdir(parents=True)
    (d / "validation-00000-of-00001.tfrecord").write_bytes(encode_records(recs))
    (d / "validation-00000-of-00001.stats.json").write_text("{}")
    cfg = load_config(None, [f"output.url={tmp_path / 'out'}"])
    data = ReportData(cfg, storage_from_config(cfg)).load()
    assert [s["boxes"][0][5] for s in data.samples] == [False, False, True]
