"""Headless Chromium loads the web page, uploads an image and sees the boxes drawn."""

from __future__ import annotations

import pytest
from browser_helpers import chromium_driver
from serving_helpers import ServiceThread, blob_image, make_export

from openimages_od.config import load_config
from openimages_od.serving.draw import color_for

pytestmark = [pytest.mark.browser, pytest.mark.tf, pytest.mark.integration]


@pytest.fixture
def driver():
    with chromium_driver(window_size="1100,800") as drv:
        yield drv


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
