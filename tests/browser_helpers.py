"""Headless Debian Chromium through Selenium, for the page tests (report and web UI)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@contextmanager
def chromium_driver(window_size: str = "1280,2000", page_load_timeout_s: float = 30.0) -> Iterator[Any]:
    """A Selenium Chrome driver on Debian's chromium, or skip with the reason.

    The browser runs with a profile directory of its own, removed with the browser on exit (each run
    used to leave one behind in /tmp).
    """
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (dev extra)")
    binary = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver")
    if not binary or not driver_bin:
        pytest.skip("needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--window-size={window_size}")
    profile = tempfile.mkdtemp(prefix="oiod-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
        try:
            driver.set_page_load_timeout(page_load_timeout_s)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
