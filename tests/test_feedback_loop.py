"""The loop of issue 28, end to end on a real server, a real UI in headless Chromium and real training:
serve v1 of the tiny domain with feedback on; people correct the photos v1 gets wrong (teal photos,
which are red in this story and which v1, trained on three plain colours, never calls red) through the
API and through the UI's "Not right?"; `thali feedback export` writes them as a collection; v2 trains
on the original photos plus the corrections (`--data A --data B`); `thali publish` and `thali registry
promote`; the `thali serve --watch` replica swaps to v2; the corrected photos' answers change, and the
metrics count the feedback."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from api_support import free_port, start_server, stop_server
from helpers import thali_command, write_tiny_domain

pytestmark = pytest.mark.slow

TEAL = (40, 170, 170)
#: the recipe of the tiny run v1 came from (tests/conftest.py), trained longer: two kinds of red now
RECIPE = [
    "model.params={width: 16, num_stages: 3, input_size: 32}",
    "training.epochs=10",
    "augmentation.mix_prob=0",
    "optimizer.lr=0.01",
]
API_CORRECTIONS, UI_CORRECTIONS = 14, 2


def teal_photos(count: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(count):
        pixels = np.clip(np.array(TEAL) + rng.normal(0, 25, (36, 44, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def answer(url: str, photo: bytes) -> dict[str, Any]:
    response = requests.post(f"{url}/v1/domains/tiny/predict", files={"image": ("p.jpg", photo)}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def run(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [*thali_command(), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def ui_process(api: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    handle = open(log, "wb")  # noqa: SIM115 - the UI's log; closed with the process
    process = subprocess.Popen(
        [*thali_command(), "ui", "--api", api, "--port", str(port)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(url + "/_stcore/health", timeout=2).text.strip() == "ok":
                return process, url
        except requests.RequestException:
            pass
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.5)
    pytest.fail("thali ui did not come up within 90 s")


def correct_through_the_api(url: str, photos: list[bytes], label: str) -> None:
    for photo in photos:
        sent = requests.post(
            f"{url}/v1/domains/tiny/feedback",
            files={"image": ("teal.jpg", photo)},
            data={"label": label, "note": "teal plates are red here"},
            timeout=30,
        )
        assert sent.status_code == 201 and sent.json()["agreed"] is False, sent.text


def correct_in_the_browser(ui: str, photo: Path, label: str) -> None:
    """Upload ``photo`` on the classify page, open "Not right?", choose ``label``, send it."""
    from browser_support import element, headless_chromium, wait_for_text
    from selenium.webdriver.common.by import By

    with headless_chromium() as chrome:
        chrome.get(ui)  # type: ignore[attr-defined]
        wait_for_text(chrome, "Classify")
        element(chrome, "input[type=file]").send_keys(str(photo))  # type: ignore[attr-defined]
        wait_for_text(chrome, "Not right?")
        toggle = [e for e in chrome.find_elements(By.TAG_NAME, "summary") if "Not right?" in e.text]  # type: ignore[attr-defined]
        assert toggle, "the answer offers Not right?"
        toggle[0].click()
        wait_for_text(chrome, "What it really shows")
        time.sleep(1.0)  # the expander opens
        boxes = chrome.find_elements(By.CSS_SELECTOR, "[data-testid=stSelectbox]")  # type: ignore[attr-defined]
        box = next(b for b in boxes if "What it really shows" in b.text)
        box.find_element(By.CSS_SELECTOR, "input").click()
        time.sleep(0.5)
        offered = chrome.find_elements(By.CSS_SELECTOR, "[role=option]")  # type: ignore[attr-defined]
        options = [o for o in offered if o.text.strip() == label]
        assert options, (f"the correction offers {label}", [o.text for o in offered], box.text)
        options[0].click()
        time.sleep(0.5)
        send = [b for b in chrome.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Send correction"]  # type: ignore[attr-defined]
        assert send, "a Send correction button"
        send[0].click()
        wait_for_text(chrome, "Thanks")


def test_corrections_train_the_next_model_and_the_replica_serves_it(
    tiny_export: Path, tiny_data: Path, registries: Any, tmp_path: Path
) -> None:
    from thali.core import load_config
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.trainer import TrainOptions, train
    from thali.registry import ModelRegistry

    registry, store = tmp_path / "registry", tmp_path / "feedback"
    ModelRegistry(registry, cache_dir=tmp_path / "cache").publish(tiny_export, aliases=["production"])
    env = {"THALI_CACHE": str(tmp_path / "serve-cache"), "THALI_FEEDBACK": str(store)}
    server = start_server(registry, tmp_path / "serve.log", env, "--watch", "1")
    ui = None
    try:
        # 1. v1 answers teal photos with anything but red
        photos = teal_photos(API_CORRECTIONS + UI_CORRECTIONS, seed=11)
        before = [answer(server.url, p) for p in photos]
        assert all(a["version"] == 1 for a in before)
        assert all(a["predictions"][0]["label"] != "red" for a in before), [
            a["predictions"][0] for a in before
        ]
        # 2. corrections through the API ...
        correct_through_the_api(server.url, photos[:API_CORRECTIONS], "red")
        # ... and through the UI, in headless Chromium
        ui, ui_url = ui_process(server.url, tmp_path / "ui.log")
        for i, photo in enumerate(photos[API_CORRECTIONS:]):
            path = tmp_path / f"teal_ui_{i}.jpg"
            path.write_bytes(photo)
            correct_in_the_browser(ui_url, path, "Red")
        listed = requests.get(f"{server.url}/v1/domains/tiny/feedback", timeout=30).json()
        assert listed["counts"]["red"]["corrected"] == len(photos)
        # 3. export the corrections as a collection
        out = tmp_path / "corrections"
        printed = run("feedback", "export", "tiny", "--store", str(store), "--out", str(out))
        assert f"{len(photos)} in {out}" in printed, printed
        assert len(list((out / "red").iterdir())) == len(photos)
        # 4. v2 on the original photos plus the corrections
        config = load_config(write_tiny_domain(tmp_path / "cfg"), RECIPE)
        v2_run = tmp_path / "v2"
        train(
            config, registries, TrainOptions(run_dir=v2_run, data=[str(tiny_data), str(out)], progress=False)
        )
        v2_export = tmp_path / "v2_export"
        export_run(
            v2_run, registries, out_dir=v2_export, overrides=["export.variants=[fp32]"], progress=False
        )
        # 5. publish, promote: the watching replica swaps to v2
        run("publish", str(v2_export), "--registry", str(registry))
        run("registry", "promote", "tiny", "2", "--alias", "production", "--registry", str(registry))
        deadline = time.time() + 90
        while server.get("/v1/domains/tiny").json()["version"] != 2:
            assert time.time() < deadline, "the replica did not swap to v2 within 90 s"
            time.sleep(0.5)
        # 6. the corrected photos' answers change, and the metrics show the feedback
        after = [answer(server.url, p) for p in photos]
        assert all(a["version"] == 2 for a in after)
        red = sum(a["predictions"][0]["label"] == "red" for a in after)
        assert red >= 0.75 * len(photos), [a["predictions"][0] for a in after]
        metrics = server.get("/metrics").text
        line = next(
            m for m in metrics.splitlines() if m.startswith('thali_feedback_total{domain="tiny",label="red"')
        )
        assert 'outcome="corrected"' in line and float(line.split()[-1]) == len(photos), line
    finally:
        if ui is not None:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)
        stop_server(server)
