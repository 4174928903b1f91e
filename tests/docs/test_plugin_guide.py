"""docs/writing-a-domain-plugin.md, followed literally: every file it shows is written as shown, every
command it shows is run in order (a throwaway plugin package installed for real, then validated,
checked, trained, exported, published, served and asked about a photo). Only the install target and
the port change: ``pip install -e DIR`` installs into a private folder on PYTHONPATH instead of this
checkout's environment, and the server gets a free port of 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from api_support import free_port
from helpers import REPO

GUIDE = REPO / "docs" / "writing-a-domain-plugin.md"
COLOURS = {"unripe": (60, 170, 40), "ripe": (235, 200, 40), "overripe": (110, 60, 20)}


def guide_blocks() -> tuple[dict[str, str], list[str]]:
    """(files by path, console commands in order) of the guide's fenced blocks."""
    files, commands = {}, []
    for lang, info, body in re.findall(r"^```(\w*)([^\n]*)\n(.*?)^```", GUIDE.read_text(), re.M | re.S):
        if match := re.search(r"\bfile=(\S+)", info):
            files[match.group(1)] = body
        elif lang == "console":
            commands += [line[2:].strip() for line in body.splitlines() if line.startswith("$ ")]
    return files, commands


def write_photos(folder: Path, per_class: int = 16) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (72, 80, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            (folder / f"{name}_{i + 1:04d}.jpg").write_bytes(buffer.getvalue())


def test_the_guide_files_are_complete() -> None:
    files, commands = guide_blocks()
    assert {"thali-fruit/pyproject.toml", "thali-fruit/thali_fruit/plugin.py"} <= set(files)
    assert any(c.startswith("thali train") for c in commands) and any(c.startswith("curl") for c in commands)


@pytest.mark.slow
def test_following_the_guide_gives_a_served_domain(tmp_path: Path) -> None:
    files, commands = guide_blocks()
    work, site = tmp_path / "work", tmp_path / "site"
    for rel, body in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(body)
    write_photos(work / "data" / "fruit")
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THALI_", "PYTHONPATH"))}
    env.update(
        PYTHONPATH=str(site), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", THALI_CACHE=str(tmp_path / "c")
    )
    port = str(free_port())
    server: subprocess.Popen[bytes] | None = None
    outputs: dict[str, str] = {}
    try:
        for command in commands:
            if command.startswith("pip install -e "):
                target = command.removeprefix("pip install -e ")
                pip = f"{sys.executable} -m pip install -q --no-deps --no-build-isolation"
                command = f"{pip} --target {site} {target}"
            command = command.replace("8000", port)
            if command.endswith("&"):
                args = shlex.split(command[:-1])
                assert args[:2] == ["thali", "serve"], command
                log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the server's own log
                server = subprocess.Popen(args, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
                _wait_ready(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log")
                continue
            done = subprocess.run(
                ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"$ {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"$ {command}\n{done.stderr[-3000:]}"
            outputs[command.split()[1] if command.startswith("thali") else command.split()[0]] = done.stdout

        plugins = outputs["plugins"]
        assert "thali_fruit" in plugins and "thali-fruit 0.1.0" in plugins
        components = ("fruit_convnet", "spatial_gate", "ordinal_ce", "prefixed_files", "fruit_ripeness")
        for component in (*components, "ort_basic", "onnx_one_thread"):
            assert component in plugins, component
        assert re.search(r"\b0 failed\b", outputs["check"]), outputs["check"]
        for check in ("ort_basic", "onnx_one_thread"):  # the guide's exporter and backend really ran
            ran = re.search(rf"{check}.*(round trip|capabilities)", outputs["check"])
            assert ran, outputs["check"]
        answer = json.loads(outputs["curl"])
        assert answer["predictions"][0]["label"] == "ripe", answer
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"thali serve not ready within 120 s:\n{log.read_text()[-3000:]}")
