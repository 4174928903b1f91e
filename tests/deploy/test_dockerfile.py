"""The Dockerfile checked with Docker's own parser (there is no Docker engine here): its stages, the
serving image's user, healthcheck and entry command; then that entry command run outside Docker, in a
fresh environment built the way the Dockerfile builds it (no torch in it), against the bundled models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import requests
from api_support import free_port
from dockerfile_support import VENV, parse, stage
from helpers import REPO

pytest.importorskip("dockerfile", reason="the `dockerfile` parser is in the dev extra")


def test_stages_and_the_default_target() -> None:
    global_args, stages = parse()
    assert [s.name for s in stages] == ["base", "build", "train", "serve"]
    assert stages[-1].name == "serve"  # `docker build .` builds the last stage: the serving image
    assert global_args["BASE"].startswith("python:3.1")
    assert stage("base").base == "${BASE}"  # the CUDA build swaps the base image only
    assert stage("build").base == "base"
    assert stage("train").base == "build" and stage("serve").base == "base"


def test_the_serving_image_has_no_training_stack() -> None:
    build, serve = stage("build"), stage("serve")
    install = " ".join(c.value[0] for c in build.all("RUN"))
    assert "/opt/venv/bin/pip install" in install
    for word in ("[train]", "[dev]", "torch", "timm", "albumentations"):
        assert word not in install, word
    copied = [c for c in serve.all("COPY") if c.flags]
    assert [c.flags for c in copied] == [("--from=build",)] and copied[0].value == (VENV, VENV)
    assert ".[train]" in " ".join(c.value[0] for c in stage("train").all("RUN"))


def test_the_serving_image_runs_as_a_user_with_a_healthcheck_and_tini() -> None:
    base, serve = stage("base"), stage("serve")
    user = serve.one("USER").value[0]
    assert user not in ("root", "0") and not user.startswith("0:")
    setup = " ".join(c.value[0] for c in base.all("RUN"))
    assert f"--user-group {user}" in setup and "tini" in setup
    check = serve.one("HEALTHCHECK")
    assert check.value[0] == "CMD" and any("/healthz" in part for part in check.value[1:])
    assert any(f.startswith("--interval=") for f in check.flags)
    assert serve.one("ENTRYPOINT").value[:3] == ("tini", "--", "thali")  # gunicorn runs as PID 1's child
    command = serve.one("CMD").value
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    assert serve.one("STOPSIGNAL").value[0] == "SIGTERM"
    env = serve.env()
    bundled = [c.value for c in serve.all("COPY") if not c.flags]
    assert ("models", env["THALI_REGISTRY"]) in bundled  # the bundled registry, baked in
    assert env["PATH"].startswith(f"{VENV}/bin")


def test_the_gpu_build_argument_swaps_in_onnxruntime_gpu() -> None:
    build = stage("build")
    assert build.args()["ORT_PACKAGE"] == "onnxruntime"
    install = " ".join(c.value[0] for c in build.all("RUN"))
    assert "pip uninstall -y onnxruntime" in install and 'pip install "$ORT_PACKAGE"' in install
    text = (REPO / "Dockerfile").read_text()
    assert "--build-arg ORT_PACKAGE=onnxruntime-gpu" in text and "--build-arg BASE=nvidia/cuda" in text


def test_the_build_context_has_every_package_folder() -> None:
    folders = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    copied = {c.value[0] for c in stage("build").all("COPY")}
    assert {f.split("/")[0] for f in folders} <= copied
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "!models/**/*.onnx" in ignored and ".venv" in ignored and "runs" in ignored


def _image_env(venv: Path, root: Path) -> dict[str, str]:
    """The serving stage's ENV with its paths mapped into ``root``; nothing of this checkout's env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THALI_", "VIRTUAL_ENV", "PYTHONPATH"))}
    for key, value in stage("serve").env().items():
        env[key] = (
            value.replace(VENV, str(venv)).replace("/opt/thali", str(root)).replace("$PATH", env["PATH"])
        )
    env["HOME"] = str(root / "home")
    return env


def _image_root(tmp_path: Path) -> Path:
    """/opt/thali of the image: the serving stage's COPY of the bundled registry."""
    root = tmp_path / "opt-thali"
    for command in stage("serve").all("COPY"):
        if not command.flags:
            source, target = command.value
            shutil.copytree(REPO / source, Path(target.replace("/opt/thali", str(root))))
    (root / "home").mkdir(parents=True)
    return root


@pytest.mark.slow
def test_the_image_entry_command_serves_the_bundled_models_and_stops_gracefully(
    image_venv: Path, tmp_path: Path
) -> None:
    serve = stage("serve")
    root = _image_root(tmp_path)
    env = _image_env(image_venv, root)
    port = str(free_port())
    entry = [*serve.one("ENTRYPOINT").value, *serve.one("CMD").value]
    assert entry[:2] == ["tini", "--"]
    command = [port if a == "8000" else "127.0.0.1" if a == "0.0.0.0" else a for a in entry[2:]]
    healthcheck = [a.replace(":8000/", f":{port}/") for a in serve.one("HEALTHCHECK").value[1:]]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=env, cwd=root / "home", stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the image's HEALTHCHECK did not pass within 120 s"
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        domains = requests.get(f"{url}/v1/domains", timeout=10).json()
        assert "south_asian_food" in json.dumps(domains)
        from api_support import jpeg

        answer = requests.post(
            f"{url}/v1/domains/south_asian_food/predict", files={"image": jpeg("red", (120, 90))}, timeout=30
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5, answer.text
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends (through tini)
        assert process.wait(timeout=45) == 0
        assert "Handling signal: term" in (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
