"""The README's main command, the way a newcomer runs it: a fresh clone with no dataset beside it,
``make run`` (which builds the serving environment and starts ``thali up``), the URLs it prints, a real
dish photo through the API to the bundled model, the UI page in headless Chromium, then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from api_support import free_port
from browser_support import element, headless_chromium, wait_for_text
from helpers import REPO, alive, descendants, kill_tree, read_until

# Photos the bundled model gets right (top-1); read by the test client, never by the server.
DISHES = ("jalebi", "dosa", "momo")


def _readme_main_command() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
    assert block, "the README starts with a code block holding the main command"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    run = [c for c in commands if c.startswith("make run")]
    assert run, f"no `make run` in the README's first code block: {commands}"
    return run[0]


def _newcomer_env() -> dict[str, str]:
    drop = ("THALI_", "VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "/.venv/" not in p + "/")
    return env


@pytest.mark.slow
def test_make_run_in_a_fresh_clone_serves_the_bundled_dish_recogniser(
    tmp_path: Path, datasets_root: Path
) -> None:
    if not shutil.which("git") or not shutil.which("make"):
        pytest.skip("git and make are needed to run the README's main command")
    assert _readme_main_command() == "make run"
    clone = tmp_path / "thali"  # no ../shared beside it, THALI_DATA unset
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    assert not (clone.parent / "shared").exists()
    port, ui_port = free_port(), free_port()
    process = subprocess.Popen(
        ["make", "run", f"ARGS=--port {port} --ui-port {ui_port}"],
        cwd=clone, env=_newcomer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out = read_until(
            process, "Ctrl-C stops both", 900
        )  # the serving install (from pip's cache here) and both servers
        urls = dict(re.findall(r"^  (UI|API|Swagger)\s+(http://\S+)$", out, re.M))
        assert set(urls) == {"UI", "API", "Swagger"}, out[-4000:]
        assert "thali is up, serving models" in out
        assert "Successfully installed" in out and " torch-" not in out  # the serving install only

        assert requests.get(urls["Swagger"], timeout=10).status_code == 200
        served = json.dumps(requests.get(urls["API"], timeout=10).json())
        assert "south_asian_food" in served and "plant_disease" in served  # both bundled domains
        api = urls["API"].removesuffix("/v1/domains")
        for dish in DISHES:
            photo = sorted((datasets_root / "south_asian_food" / dish).glob("*.jp*g"))[-1]
            answer = requests.post(
                f"{api}/v1/domains/south_asian_food/predict", files={"image": photo.read_bytes()}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["label"] == dish, (photo.name, answer.json())

        with headless_chromium() as chrome:
            chrome.get(urls["UI"])  # type: ignore[attr-defined]
            wait_for_text(chrome, "Classify")
            wait_for_text(chrome, "South Asian")
            from selenium.webdriver.common.by import By

            photo = sorted((datasets_root / "south_asian_food" / DISHES[0]).glob("*.jp*g"))[-1]
            element(chrome, "input[type=file]").send_keys(str(photo))  # type: ignore[attr-defined]
            wait_for_text(chrome, "ms on the server")
            body = chrome.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
            assert "Jalebi" in body and "Traceback" not in body

        started = descendants(process.pid)  # make, thali up, the API (master and worker), the UI
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches make and thali up
        process.wait(timeout=60)
        deadline = time.time() + 60  # make returns at once; thali up stops the API and the UI after it
        while survivors := alive(started):
            assert time.time() < deadline, f"still running 60 s after Ctrl-C: {survivors}"
            time.sleep(0.5)
        for url in (f"{api}/healthz", urls["UI"]):
            with pytest.raises(requests.ConnectionError):
                requests.get(url, timeout=2)
    finally:  # nothing of a failed run outlives the test
        kill_tree(process, locals().get("started", set()))
