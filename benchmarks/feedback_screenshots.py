"""Screenshots of the UI's feedback loop for docs/feedback.md, taken in headless Chromium.

    python benchmarks/feedback_screenshots.py [--out docs/feedback]
                                              [--registry URL --domain NAME --photo PATH]

Starts ``thali serve`` with feedback on (``THALI_FEEDBACK`` in a temporary folder) and ``thali ui`` on
127.0.0.1, sends ten corrections through the API so the Feedback page has something to show, then, in
the browser: uploads a photo on the Classify page, opens "Not right?", picks another class and saves
``classify-not-right.png``; sends it, waits for the confirmation, opens the Feedback page and saves
``feedback-page.png``.

Without ``--registry`` the model is the tests' colour domain (blue, green, red), trained and exported here
in a few seconds on photos made here: the committed screenshots hold no dataset photo (the bundled
datasets may not be redistributed). With ``--registry``/``--domain``/``--photo`` it shows a real model
on a photo of yours instead (for a look, not for committing). Chromium and chromedriver: ``make browser``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import requests  # noqa: E402
from api_support import (  # noqa: E402 - the tests' helpers
    SHIPPED_THRESHOLDS,
    free_port,
    jpeg,
    start_server,
    stop_server,
    with_unknown_thresholds,
)
from helpers import thali_command, write_tiny_domain, write_tiny_imagefolder  # noqa: E402

WINDOW = (1400, 1000)
KEY = "screenshot-feedback-key-0123456789"


def say(text: str) -> None:
    print(text, flush=True)


def colour_registry(root: Path) -> str:
    """The tests' colour domain, trained on photos made here, exported (fp32) and published."""
    from thali.core import build_plugin_manager, load_config
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.trainer import TrainOptions, train
    from thali.registry import ModelRegistry

    registries = build_plugin_manager(autoload=False).registries
    data = write_tiny_imagefolder(root / "data", per_class=16, broken=False)
    overrides = [
        "model.params={width: 16, num_stages: 3, input_size: 32}",
        "training.epochs=6",
        "augmentation.mix_prob=0",
        "optimizer.lr=0.01",
    ]
    config = load_config(write_tiny_domain(root / "cfg"), overrides)
    train(config, registries, TrainOptions(run_dir=root / "run", data=str(data), progress=False))
    export_run(
        root / "run",
        registries,
        out_dir=root / "export",
        overrides=["export.variants=[fp32]", "export.unknown.stages=[0, 1]"],
        progress=False,
    )
    # the unknown thresholds the tests ship (a few validation photos cannot place them): the colours
    # are answered, a colour between them is flagged
    with_unknown_thresholds(root / "export", root / "export_shipped", SHIPPED_THRESHOLDS)
    registry = ModelRegistry(root / "registry", cache_dir=root / "cache")
    registry.publish(root / "export_shipped", aliases=["production"])
    return str(root / "registry")


def tinted(
    rgb: tuple[int, int, int], seed: int, size: tuple[int, int] = (320, 240), quality: int = 90
) -> bytes:
    """A noisy photo of one colour, made here: between the classes, one the model is unsure of."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(seed).normal(0, 25, (size[1], size[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality
    )
    return buffer.getvalue()


def seed_feedback(url: str, domain: str, sent: list[tuple[bytes, str]]) -> None:
    """Corrections through the API, as other people would have sent them: (photo, the right label)."""
    for i, (photo, label) in enumerate(sent):
        answer = requests.post(
            f"{url}/v1/domains/{domain}/feedback",
            files={"image": (f"photo{i}.jpg", photo)},
            data={"label": label},
            headers={"X-Feedback-Key": KEY},
            timeout=60,
        )
        if answer.status_code != 201:
            raise SystemExit(f"feedback was refused ({answer.status_code}): {answer.text}")


def start_ui(api: str, domain: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "THALI_FEEDBACK_KEY": KEY, "THALI_UI_DOMAIN": domain}
    handle = open(log, "wb")  # noqa: SIM115 - the process holds it until it ends
    process = subprocess.Popen(
        [*thali_command(), "ui", "--api", api, "--port", str(port)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(url + "/_stcore/health", timeout=2).text.strip() == "ok":
                return process, url
        except requests.RequestException:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop_ui(process)
    raise SystemExit(f"thali ui did not come up: {log.read_text()[-2000:]}")


def stop_ui(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def shoot(chrome: Any, path: Path) -> None:
    """A screenshot as a small PNG (an adaptive palette: UI colours survive, the file shrinks)."""
    from PIL import Image

    image = Image.open(io.BytesIO(chrome.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    say(f"wrote {shown} ({path.stat().st_size // 1024} KB)")


def pick_option(chrome: Any, box: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    box.click()
    time.sleep(0.5)
    options = [o for o in chrome.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == text]
    if not options:
        raise SystemExit(f"no option {text!r} in the select box")
    options[0].click()


def browse(ui: str, photo: Path, right: str, out: Path) -> None:
    from browser_support import element, headless_chromium, wait_for_text
    from selenium.webdriver.common.by import By

    with headless_chromium() as chrome:
        driver: Any = chrome
        driver.set_window_size(*WINDOW)
        driver.get(ui)
        wait_for_text(driver, "Classify")
        wait_for_text(driver, "top-1")
        element(driver, "input[type=file]").send_keys(str(photo))  # type: ignore[attr-defined,unused-ignore]
        wait_for_text(driver, "ms on the server")
        summary = [
            s for s in driver.find_elements(By.CSS_SELECTOR, "[data-testid=stExpander] summary")
            if "Not right?" in s.text
        ]  # fmt: skip
        if not summary:
            raise SystemExit('no "Not right?" under the answer: is feedback on?')
        summary[0].click()
        wait_for_text(driver, "Send correction")
        box = driver.find_elements(By.CSS_SELECTOR, "[data-testid=stExpander] [data-testid=stSelectbox]")[0]
        pick_option(driver, box, right)
        time.sleep(1.0)
        button = next(
            b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Send correction"
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'end'}); window.scrollBy(0, 40)", button)
        time.sleep(0.5)
        shoot(driver, out / "classify-not-right.png")
        button.click()
        wait_for_text(driver, "Thanks — saved as")

        link = [
            a
            for a in driver.find_elements(By.TAG_NAME, "a")
            if a.text.strip().splitlines()[-1:] == ["Feedback"]
        ]
        if not link:
            raise SystemExit("the page navigation has no Feedback page")
        link[0].click()
        wait_for_text(driver, "Per class")
        time.sleep(2.5)  # the thumbnails and the table draw
        body = driver.find_element(By.TAG_NAME, "body").text
        if "Traceback" in body:
            raise SystemExit(f"the Feedback page failed: {body[:2000]}")
        driver.set_window_size(WINDOW[0], 1300)
        time.sleep(1.0)
        shoot(driver, out / "feedback-page.png")


def grey(size: tuple[int, int] = (320, 240)) -> bytes:
    """A plain grey photo: none of the colour classes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "feedback")
    parser.add_argument(
        "--registry", help="a registry holding --domain (default: the colour domain, made here)"
    )
    parser.add_argument("--domain", help="the domain of --registry to show")
    parser.add_argument("--photo", type=Path, help="the photo to classify and correct (with --registry)")
    args = parser.parse_args()
    if bool(args.registry) != bool(args.domain) or bool(args.registry) != bool(args.photo):
        parser.error("--registry, --domain and --photo go together")
    if not (shutil.which("chromium") or shutil.which("google-chrome")) or not shutil.which("chromedriver"):
        raise SystemExit("headless Chromium is not installed: run `make browser` (as root)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="thali-feedback-shots-") as tmp:
        root = Path(tmp)
        if args.registry:
            registry, domain, photo = args.registry, args.domain, args.photo.read_bytes()
            probe, sent = photo, []  # the Feedback page shows what the store already holds
        else:
            say("training the colour domain (a few seconds) ...")
            registry, domain = colour_registry(root), "tiny"
            teal = (40, 150, 130)  # nearer green than blue; the model's best guess is blue
            photo, probe = tinted(teal, seed=7), tinted(teal, seed=7, quality=91)  # probe: not from the cache
            sent = [
                *((jpeg(c, seed=30 + i), c) for i, c in enumerate(["red", "green", "blue", "green"])),
                (tinted((40, 120, 160), seed=41), "blue"),
                (tinted((150, 180, 40), seed=42), "green"),
                (tinted((180, 90, 40), seed=43), "red"),
                (tinted((120, 60, 160), seed=44), "blue"),
                (tinted((40, 140, 120), seed=45), "green"),
                (grey(), "none_of_these"),
            ]
        env = {
            "THALI_FEEDBACK": str(root / "store"),
            "THALI_FEEDBACK_KEY": KEY,
            "THALI_CACHE": str(root / "c"),
        }
        server = start_server(registry, root / "serve.log", env, "--domain", domain)
        ui = None
        try:
            info = requests.get(f"{server.url}/v1/domains/{domain}", timeout=30).json()
            if not info.get("feedback"):
                raise SystemExit(f"the server says feedback is off for {domain}: {info}")
            seed_feedback(server.url, domain, sent)
            said = requests.post(
                f"{server.url}/v1/domains/{domain}/predict", files={"image": probe}, timeout=60
            ).json()["predictions"][0]["label"]
            preferred = [c for c in info["classes"] if c["name"] == "green"] if not args.registry else []
            right = next(c for c in [*preferred, *info["classes"]] if c["name"] != said)["display_name"]
            (root / "photo.jpg").write_bytes(photo)
            ui, ui_url = start_ui(server.url, domain, root / "ui.log")
            browse(ui_url, root / "photo.jpg", right, args.out)
        finally:
            if ui is not None:
                stop_ui(ui)
            stop_server(server)


if __name__ == "__main__":
    main()
