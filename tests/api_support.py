"""A real ``thali serve`` process for tests: start it on a free port of 127.0.0.1, talk to it, stop it;
small photos of the tiny domain's colour classes, made here; and the session fixtures of a served
registry (two tiny domains, one with heatmaps and two versions, and one damaged package) that the API
and UI tests share."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import thali_command, write_tiny_domain

ADMIN_KEY = "test-admin-key-0123456789"
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(colour: str, size: tuple[int, int] = (44, 36), seed: int = 0) -> bytes:
    """A small noisy photo of one colour class, made here."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class Server:
    url: str
    registry: Path | str
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def admin(self, method: str, path: str, key: str | None = ADMIN_KEY, **kwargs: Any) -> requests.Response:
        headers = {"X-API-Key": key} if key is not None else {}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_server(registry: Path | str, log: Path, env: dict[str, str] | None = None, *extra: str) -> Server:
    port = free_port()
    full_env = {**os.environ, "THALI_ADMIN_KEY": ADMIN_KEY, **(env or {})}
    handle = open(log, "wb")  # noqa: SIM115 - closed when the process is stopped
    process = subprocess.Popen(
        [*thali_command(), "serve", "--registry", str(registry), "--port", str(port), *extra],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", registry, log, process)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"thali serve exited: {log.read_text()[-3000:]}")
        try:
            if server.get("/healthz").status_code == 200 and server.get("/v1/domains").json()["domains"]:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"thali serve did not come up: {log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


# --- session fixtures (registered in tests/conftest.py) -------------------------------------------


@pytest.fixture(scope="session")
def explain_export(tiny_run: Path, registries: Any) -> Path:
    """The tiny run exported with the heatmap output (fp32 + int8), its unknown score reading stages 0
    and 1 like the session's tiny export (outputs: logits, features, stage_features, cam)."""
    from thali.core.exporting.pipeline import export_run

    out = tiny_run.parent / "export_explain"
    export_run(
        tiny_run,
        registries,
        out_dir=out,
        overrides=["export.variants=[fp32, int8]", "export.explain=true", "export.unknown.stages=[0, 1]"],
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def second_export(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, registries: Any) -> Path:
    """A second domain, trained here: two of the colours, its own name."""
    from thali.core import load_config
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.trainer import TrainOptions, train

    root = tmp_path_factory.mktemp("second_domain")
    data = root / "data"
    for colour in ("blue", "red"):
        shutil.copytree(tiny_data / colour, data / colour)
    config_path = write_tiny_domain(root / "cfg")
    text = config_path.read_text().replace("name: tiny", "name: duo")
    text = text.replace(
        "classes: [{name: blue}, {name: green}, {name: red}]", "classes: [{name: blue}, {name: red}]"
    )
    config_path.write_text(text)
    config = load_config(config_path, ["training.epochs=4", "augmentation.mix_prob=0", "optimizer.lr=0.01"])
    train(config, registries, TrainOptions(run_dir=root / "run", data=str(data), progress=False))
    out = root / "export"
    export_run(root / "run", registries, out_dir=out, overrides=["export.variants=[fp32]"], progress=False)
    return out


# tiny v1 ships these unknown thresholds (k-NN, residual): the tiny model's k-NN scores sit at 0.998-1.0
# for its colours and ~0.966 for a checkerboard (int8), and 6 validation photos cannot place a 5 %
# threshold between them; the residual score is never under -1
SHIPPED_THRESHOLDS = (0.985, -1.0)


def with_unknown_thresholds(export: Path, out: Path, thresholds: tuple[float, float]) -> Path:
    """A copy of ``export`` whose calibration.json ships ``thresholds`` for its feature scores (the
    export report's checksum follows, as ``thali export`` would have written it)."""
    import hashlib

    shutil.copytree(export, out)
    calibration = json.loads((out / "calibration.json").read_text())
    calibration["unknown"]["knn_threshold"], calibration["unknown"]["residual_threshold"] = thresholds
    (out / "calibration.json").write_text(json.dumps(calibration))
    report = json.loads((out / "export.json").read_text())
    report["files"]["calibration.json"] = hashlib.sha256((out / "calibration.json").read_bytes()).hexdigest()
    (out / "export.json").write_text(json.dumps(report))
    return out


@pytest.fixture(scope="session")
def api_registry(
    tmp_path_factory: pytest.TempPathFactory, explain_export: Path, second_export: Path, tiny_export: Path
) -> Path:
    """tiny v1 (production, with heatmaps) and v2; duo v1 (latest only); broken v1 (damaged file)."""
    from thali.registry import ModelRegistry

    root = tmp_path_factory.mktemp("api_registry")
    registry = ModelRegistry(root / "registry", cache_dir=root / "cache")
    registry.publish(
        with_unknown_thresholds(explain_export, root / "v1", SHIPPED_THRESHOLDS), aliases=["production"]
    )
    registry.publish(explain_export)
    registry.publish(second_export)
    from export_support import edited_export

    broken = edited_export(tiny_export, root / "broken_export", domain="broken")
    registry.publish(broken, aliases=["production"])
    model = root / "registry" / "broken" / "versions" / "1" / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # a flipped tail: fails its checksum
    return root / "registry"


@pytest.fixture(scope="session")
def server(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {"THALI_MAX_UPLOAD_BYTES": str(300 * 1024), "THALI_CACHE": str(log.parent / "cache")}
    running = start_server(api_registry, log, env)
    try:
        yield running
    finally:
        stop_server(running)
