"""A real headless Chromium for the tests and the screenshots, through selenium.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them): selenium is given
the driver's path, so selenium-manager never downloads anything. Every browser gets a fresh
profile directory and no background networking. Without a browser the tests skip, except
under ``CI=true`` where they fail (a CI machine must have one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import pytest

CHROMIUM = os.environ.get("QSAE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("QSAE_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def missing() -> str | None:
    """Why no browser can start here (None when one can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no {path}: sudo apt-get install chromium chromium-driver (Debian's {package})"
    return None


def require() -> None:
    """Skip the test without a browser; fail under CI=true, where one must be installed."""
    why = missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and no browser: {why}")
    pytest.skip(why)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium driven by selenium; its profile and process are removed at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qsae-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for driver.get_log
    service = Service(executable_path=CHROMEDRIVER)  # a path given: selenium-manager is never asked
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        try:
            driver.quit()  # ends chromium and chromedriver (the service reaps its process)
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[dict]:
    """The browser console's SEVERE entries since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
