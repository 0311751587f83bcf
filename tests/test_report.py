"""The HTML report on partial outputs: every section degrades to a note, eval charts appear from metrics."""

from __future__ import annotations

import json

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
    metrics = {"step": 40, "coco": {"AP": 0.41, "AP50": 0.77},
               "openimages": {"mAP": 0.7, "per_class": {
                   "1": {"ap": 0.8, "name": "Ball", "pr_curve": curve},
                   "2": {"ap": 0.6, "name": "Window", "pr_curve": None}}}}
    (out / "eval" / "metrics-40.json").write_text(json.dumps(metrics))
    (out / "eval" / "metrics-7.json").write_text(json.dumps({**metrics, "step": 7, "coco": {"AP": 0.0}}))
    cfg = load_config(None, [f"output.url={out}"])
    url = run_report(cfg)
    html = (out / "report.html").read_text()
    assert url.endswith("report.html")
    assert "metrics-40.json" in html  # the latest step, not the last listed
    assert 'alt="per-class AP"' in html and 'alt="precision-recall curves"' in html
    assert "0.7700" in html
