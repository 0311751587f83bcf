"""Headless Chromium loads the web page, uploads an image and sees the boxes drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_helpers import ServiceThread, blob_image, make_export

from openimages_od.config import load_config
from openimages_od.serving.draw import color_for

pytestmark = [pytest.mark.browser, pytest.mark.tf, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def driver():
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip(
            f"needs Debian chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
            f"apt-get install chromium chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,800",
        "--disable-dev-shm-usage",
    ):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def test_page_upload_shows_boxes(driver, tmp_path, artifacts_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    export = make_export(tmp_path / "export")
    img = tmp_path / "blobs.png"
    img.write_bytes(blob_image())
    cfg = load_config(None, [f"serve.model={export}"])
    with ServiceThread(cfg) as svc:
        driver.get(svc.url("/"))
        WebDriverWait(driver, 20).until(lambda d: "model oiod" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "file").send_keys(str(img))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
        status = driver.find_element(By.ID, "status").text
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status
        rows = driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == ["Car", "Dog"]
        # Read back canvas pixels: the Car box's left edge is drawn in the Car colour.
        px = driver.execute_script(
            "const c=document.getElementById('canvas');"
            "const g=c.getContext('2d');"
            "return [c.width, c.height, Array.from(g.getImageData(41,65,1,1).data),"
            " Array.from(g.getImageData(80,65,1,1).data), Array.from(g.getImageData(201,170,1,1).data)];"
        )
        assert px[:2] == [320, 240]
        assert tuple(px[2][:3]) == color_for(1)
        assert tuple(px[3][:3]) == (230, 20, 20)  # inside the box: the image itself
        assert tuple(px[4][:3]) == color_for(3)
        shot = artifacts_dir / "serve-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
