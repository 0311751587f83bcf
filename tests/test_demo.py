"""`oiod demo` end to end (small settings) and the HTML report it writes, seen in Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from browser_helpers import chromium_driver, console_errors

pytestmark = [pytest.mark.integration, pytest.mark.tf, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "oiod-demo"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "openimages_od",
            "demo",
            "--workdir",
            str(work),
            "--images",
            "40",
            "--steps",
            "8",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.input_size=128",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    return work, proc


def test_demo_exits_0_and_writes_every_output(demo_run):
    work, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = work / "output"
    assert list((out / "tfrecords" / "train").glob("*.tfrecord"))
    assert list((out / "tfrecords" / "validation").glob("*.stats.json"))
    assert (out / "label_map.pbtxt").read_text().count("item {") == 3
    assert list((out / "model").glob("ckpt-*.index")) or list((out / "model").rglob("*.index"))
    metrics = list((out / "eval").glob("metrics-*.json"))
    assert metrics and "coco" in json.loads(metrics[0].read_text())
    assert (out / "export" / "saved_model" / "saved_model.pb").exists()
    assert (out / "export" / "model.json").exists()
    annotated = list((work / "detections").glob("*.jpg")) + list((work / "detections").glob("*.png"))
    assert annotated
    assert (out / "report.html").stat().st_size > 10_000
    assert "report.html" in proc.stdout and "oiod demo finished" in proc.stdout


def test_report_renders_in_chromium(demo_run, artifacts_dir):
    work, proc = demo_run
    if proc.returncode != 0:
        pytest.fail("demo failed; see test_demo_exits_0_and_writes_every_output")
    with chromium_driver() as driver:
        driver.get((work / "output" / "report.html").as_uri())
        charts = driver.find_elements("css selector", "img.chart")
        assert len(charts) >= 4
        # every chart image decoded (naturalWidth > 0)
        widths = [driver.execute_script("return arguments[0].naturalWidth", c) for c in charts]
        assert all(w > 0 for w in widths), widths
        grid = driver.find_elements("css selector", ".sample-grid figure img")
        assert len(grid) >= 4
        assert all(driver.execute_script("return arguments[0].naturalWidth", g) > 0 for g in grid)
        text = driver.find_element("tag name", "body").text
        for section in ("Class balance", "Sample images", "Evaluation", "Failures"):
            assert section in text
        driver.save_screenshot(str(artifacts_dir / "report.png"))
        assert console_errors(driver) == []
