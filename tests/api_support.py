"""A real ``thali serve`` process for tests: start it on a free port of 127.0.0.1, talk to it, stop it;
and small photos of the tiny domain's colour classes, made here."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from helpers import thali_command

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
    registry: Path
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def admin(self, method: str, path: str, key: str | None = ADMIN_KEY, **kwargs: Any) -> requests.Response:
        headers = {"X-API-Key": key} if key is not None else {}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)


def start_server(registry: Path, log: Path, env: dict[str, str] | None = None, *extra: str) -> Server:
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
