"""Store URLs for registry tests, and moto's S3 server as a session fixture (registered in
tests/conftest.py, so the registry tests and the replica tests share one server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def store_url(kind: str, tmp_path: Path, s3: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if kind == "local":
        return str(tmp_path / "registry"), {}
    if kind == "memory":
        return f"memory://thali-{uuid.uuid4().hex}", {}
    assert s3 is not None
    return f"s3://models/{uuid.uuid4().hex}", {"endpoint_url": s3["endpoint_url"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """moto's standalone S3 server as a separate process on 127.0.0.1, with one bucket."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "thali", "AWS_SECRET_ACCESS_KEY": "thali", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"moto server did not start on {url}")
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="models")
        yield {"endpoint_url": url, "env": env}
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
