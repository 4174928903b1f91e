"""Headless Chromium through selenium, for the tests that load a UI page in a real browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def chromium() -> tuple[str, str]:
    """(browser binary, chromedriver); skips with the reason when they are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not browser or not Path(driver).exists():
        pytest.skip("headless Chromium is not installed (make test installs chromium and chromium-driver)")
    pytest.importorskip("selenium")
    return browser, driver


@contextmanager
def headless_chromium() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def wait_for_text(chrome: object, text: str, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(chrome, timeout).until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), text))


def element(chrome: object, css: str, timeout: float = 60) -> object:
    """The first element matching ``css``, once the page has drawn it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
