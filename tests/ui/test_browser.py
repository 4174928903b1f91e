"""End to end in a real browser: ``thali serve`` and ``thali ui`` as real processes on 127.0.0.1, driven
by headless Chromium through selenium. The screenshots land in ``test-output/ui/`` of the checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from api_support import Server, free_port, jpeg
from browser_support import element, headless_chromium, wait_for_text
from helpers import REPO, thali_command

OUTPUT = REPO / "test-output" / "ui"


@pytest.fixture(scope="module")
def ui_url(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("ui") / "ui.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [*thali_command(), "ui", "--api", server.url, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(url + "/_stcore/health", timeout=2).text.strip() == "ok":
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None:
                pytest.fail("thali ui exited early")
            time.sleep(0.5)
        else:
            pytest.fail("thali ui did not come up within 90 s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with headless_chromium() as chrome:
        yield chrome


def test_switch_domains_upload_a_photo_and_read_the_result(
    browser: object, ui_url: str, tmp_path: Path, datasets_root: Path
) -> None:
    from selenium.webdriver.common.by import By

    chrome = browser
    OUTPUT.mkdir(parents=True, exist_ok=True)
    chrome.get(ui_url)  # type: ignore[attr-defined]
    wait_for_text(chrome, "Classify")
    wait_for_text(chrome, "top-1")
    photo = tmp_path / "red.jpg"
    photo.write_bytes(jpeg("red", size=(320, 240), seed=1))
    element(chrome, "input[type=file]").send_keys(str(photo))  # type: ignore[attr-defined]
    wait_for_text(chrome, "Red")
    wait_for_text(chrome, "ms on the server")
    chrome.save_screenshot(str(OUTPUT / "classify-tiny.png"))  # type: ignore[attr-defined]

    # switch to the other domain in the sidebar's select box: the photo is asked again
    element(chrome, "[data-testid=stSelectbox]").click()  # type: ignore[attr-defined]
    option = [
        o
        for o in chrome.find_elements(By.CSS_SELECTOR, "[role=option]")  # type: ignore[attr-defined]
        if o.text.strip() == "Duo"
    ]
    assert option, "the domain switcher offers Duo"
    option[0].click()
    wait_for_text(chrome, "licence")
    time.sleep(1.0)
    body = chrome.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    assert "Red" in body and "Traceback" not in body
    food = sorted((datasets_root / "south_asian_food" / "biryani").glob("*.jp*g"))[0]
    element(chrome, "input[type=file]").send_keys(str(food))  # type: ignore[attr-defined]
    wait_for_text(chrome, food.name)
    time.sleep(1.5)
    chrome.save_screenshot(str(OUTPUT / "classify-duo.png"))  # type: ignore[attr-defined]
    assert (OUTPUT / "classify-duo.png").stat().st_size > 10_000

    # the model card page of the same domain
    link = [a for a in chrome.find_elements(By.TAG_NAME, "a") if "Model card" in a.text]  # type: ignore[attr-defined]
    assert link, "the page navigation offers the model card"
    link[0].click()
    wait_for_text(chrome, "Confusion matrix")
    wait_for_text(chrome, "Accuracy per class")
    time.sleep(2.0)  # let the charts draw
    chrome.save_screenshot(str(OUTPUT / "model-card-duo.png"))  # type: ignore[attr-defined]
    body = chrome.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    assert "Licence" in body and "Traceback" not in body
