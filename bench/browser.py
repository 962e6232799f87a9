"""Headless Chromium through Selenium, for the fleet page's browser test and benchmark.

Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and
Selenium from PyPI. The browser is started with a fresh profile and with nothing that reaches the
network on its own (no sync, no component updates, no background requests): only the page under test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

#: Where the browser and its driver are looked for, in order.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def missing() -> str | None:
    """Why a headless browser cannot be started here (``None``: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; it is in the dev extra)"
    if not any(shutil.which(b) for b in BROWSERS):
        return "no chromium on PATH (apt-get install -y chromium chromium-driver)"
    if not any(shutil.which(d) for d in DRIVERS):
        return "no chromedriver on PATH (apt-get install -y chromium-driver)"
    return None


def chrome(profile: Path, *, width: int = 1440, height: int = 900) -> Any:
    """A headless Chromium (a Selenium ``WebDriver``) with a fresh profile under ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager must not look for drivers online: the driver is given.
    os.environ.setdefault("SE_OFFLINE", "true")
    browser = next(p for p in map(shutil.which, BROWSERS) if p)
    driver = next(p for p in map(shutil.which, DRIVERS) if p)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
