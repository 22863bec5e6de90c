"""Headless Debian chromium for the page tests (the run report, the eval page): the skip marker,
a driver that never lets selenium-manager fetch anything, and loading a page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# CI (CI=true) installs both through the README's test setup and must run these; elsewhere a
# machine without them skips them
needs_browser = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and os.environ.get("CI") != "true",
                                   reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                          "chromium-driver)")


def chromium(tmp_path_factory, window: tuple[int, int] | None = None):
    """A headless chromium driver (a generator for a fixture: yields it, quits after)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium-manager must never fetch a driver or browser
        d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        d.set_page_load_timeout(60)
        if window:
            d.set_window_size(*window)
        yield d
        d.quit()


def open_page(driver, page: Path) -> list[dict]:
    """Load ``page`` and return the console entries it produced (the log is drained per call)."""
    driver.get_log("browser")  # drop entries of an earlier page
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")  # get() returns after the load event
    return driver.get_log("browser")


def preview_images(driver) -> list:
    """[src, loaded, natural width, natural height] of every ``img.preview`` (the animated
    video previews of report.html and eval.html) on the open page."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('img.preview')).map("
        "i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);")
