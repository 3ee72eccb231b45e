"""A headless Debian Chromium driven by selenium, for the view's tests and benchmark.

Skips (``pytest.skip``) with the reason when ``/usr/bin/chromium``, ``chromedriver`` or selenium is
missing (``.ci/ensure-services.sh`` installs the Debian packages ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1250")


def missing() -> str | None:
    """Why no browser can run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[dev])"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    """A selenium driver on the system Chromium, with a fresh profile folder removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="phasestream-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


IMAGE_DATA = """
const img = document.getElementById(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png');
"""
"""``driver.execute_script(IMAGE_DATA, "img-phase")``: the pixels the page shows, as a data URL."""


def text_at(driver, css: str) -> str | None:
    """The shown text of the first element ``css`` selects, or None, read in one WebDriver call: the view redraws
    its table and panels at each update, so an element found in one call can be gone by the next
    (StaleElementReferenceException, seen in CI)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : null;", css)


def attributes_at(driver, css: str, name: str) -> list:
    """Attribute ``name`` of every element ``css`` selects, read in one WebDriver call (see ``text_at``)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]));", css, name)


def click(driver, css: str, attempts: int = 5) -> None:
    """A real click on the first element ``css`` selects, found again when a redraw replaced it (see ``text_at``)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            driver.find_element("css selector", css).click()
            return
        except StaleElementReferenceException:
            if attempt == attempts - 1:
                raise
