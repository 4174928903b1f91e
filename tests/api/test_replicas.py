"""Scale-out: two real ``thali serve --watch`` processes on 127.0.0.1 share one S3 registry (moto's
server). Publishing v2 and promoting ``production`` reaches both within the watch interval while a
bounded load loop against both sees no failed request; a tampered v3 is refused and both stay on v2,
saying so in /readyz, the log and a metric."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from api_support import Server, jpeg, metric_value, start_server, stop_server

pytestmark = pytest.mark.slow

WATCH_S = 1.0


def _versions(servers: list[Server]) -> list[int | None]:
    out = []
    for server in servers:
        try:
            out.append(server.get("/v1/domains/tiny").json().get("version"))
        except requests.RequestException:
            out.append(None)
    return out


def _wait_for(servers: list[Server], version: int, limit_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if _versions(servers) == [version] * len(servers):
            return time.monotonic() - started
        time.sleep(0.1)
    seen = _versions(servers)
    raise AssertionError(f"replicas serve {seen} {limit_s:.0f} s after the promote, not v{version}")


class LoadLoop:
    """Threads posting fresh photos round-robin to every replica; bounded, stopped by the test."""

    def __init__(self, servers: list[Server], threads: int = 4, limit: int = 3000) -> None:
        self.servers, self.limit = servers, limit
        self.results: list[tuple[int, int, Any]] = []  # (replica, status, version or error)
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(threads)]

    def __enter__(self) -> LoadLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _client(self, n: int) -> None:
        session = requests.Session()
        for i in range(self.limit // len(self.threads)):
            if self.stop.is_set():
                return
            replica = (n + i) % len(self.servers)
            image = jpeg(("red", "green", "blue")[i % 3], seed=100_000 * (n + 1) + i)  # never cached
            try:
                r = session.post(
                    f"{self.servers[replica].url}/v1/domains/tiny/predict", files={"image": image}, timeout=30
                )
                outcome = (replica, r.status_code, r.json().get("version"))
            except (requests.RequestException, ValueError) as exc:
                outcome = (replica, 0, repr(exc))
            with self.lock:
                self.results.append(outcome)


def _tamper(url: str, options: dict[str, Any], version: int) -> None:
    """Flip the tail of v``version``'s int8 model in the store: its checksum no longer matches."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **options)
    path = f"{root}/tiny/versions/{version}/model.int8.onnx"
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-16] + b"tampered-bytes!!")


def test_two_replicas_follow_production_on_s3_and_refuse_a_tampered_version(
    s3_endpoint: dict[str, Any], tiny_export: Path, explain_export: Path, tmp_path: Path
) -> None:
    from thali.registry import ModelRegistry

    url = f"s3://models/replicas-{uuid.uuid4().hex[:8]}"
    options = {"endpoint_url": s3_endpoint["endpoint_url"]}
    publisher = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "publisher-cache")
    assert publisher.publish(tiny_export, aliases=["production"])["version"] == 1

    env = {**s3_endpoint["env"], "THALI_REGISTRY_OPTIONS": json.dumps(options)}
    servers: list[Server] = []
    try:
        for n in range(2):  # each replica its own cache: nothing shared but the store
            replica_env = {**env, "THALI_CACHE": str(tmp_path / f"cache-{n}")}
            log = tmp_path / f"serve-{n}.log"
            servers.append(start_server(url, log, replica_env, "--watch", str(WATCH_S)))
        assert _versions(servers) == [1, 1]

        with LoadLoop(servers) as load:
            time.sleep(1.0)
            assert publisher.publish(explain_export)["version"] == 2
            publisher.promote("tiny", 2, "production")
            took_v2 = _wait_for(servers, 2, limit_s=30)
            time.sleep(1.0)  # requests keep flowing on v2

            assert publisher.publish(tiny_export)["version"] == 3
            _tamper(url, options, 3)
            publisher.promote("tiny", 3, "production")
            time.sleep(4 * WATCH_S + 2)  # several polls of each replica
            assert _versions(servers) == [2, 2]

        failed = [r for r in load.results if r[1] != 200]
        assert len(load.results) > 100 and not failed, failed[:5]
        assert {v for _, _, v in load.results} == {1, 2}  # both versions answered, v3 never
        for n in range(2):
            assert {v for r, _, v in load.results if r == n} == {1, 2}

        for n, server in enumerate(servers):
            ready = server.get("/readyz")
            assert ready.status_code == 200, ready.text  # still ready: v2 is served
            watch = ready.json()["watch"]["tiny"]
            assert watch["ref"] == "production" and watch["refused"]["version"] == 3
            assert "does not match its checksum" in watch["refused"]["error"]
            metrics = server.get("/metrics").text
            assert metric_value(metrics, "thali_model_swaps_total", domain="tiny", outcome="swapped") == 1
            assert metric_value(metrics, "thali_model_swaps_total", domain="tiny", outcome="refused") >= 1
            assert metric_value(metrics, "thali_model_refused_version", domain="tiny") == 3
            log = (tmp_path / f"serve-{n}.log").read_text()
            assert "production now names v2; swapped v1 -> v2" in log
            assert log.count("refusing tiny v3 (production)") == 1, log[-3000:]  # said once, not per poll
        print(f"both on v2 {took_v2:.1f} s after the promote; {len(load.results)} requests, 0 failed")
    finally:
        for server in servers:
            stop_server(server)
