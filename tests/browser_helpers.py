"""Headless Debian Chromium through Selenium, for the page tests (report and web UI)."""

from __future__ import annotations

import shutil
import tempfile
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
    "--window-size=1280,2000",
]


def chromium_driver() -> Any:
    """A Selenium Chrome driver on /usr/bin/chromium, or skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver")
    if not binary or not driver_bin:
        pytest.skip("Debian chromium/chromium-driver not installed (make browser)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='oiod-chromium-')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def console_errors(driver: Any) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
