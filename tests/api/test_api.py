"""The REST service as a client sees it: a real ``thali serve`` (gunicorn) on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from typing import Any

import pytest
import requests
from api_support import SHIPPED_THRESHOLDS, Server, jpeg, metric_value

ERROR_KEYS = {"code", "status", "message", "errors"}


def assert_error(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS and body["status"] == status and body["message"], body
    if code:
        assert body["code"] == code, body
    return body


def predict(server: Server, colour: str, domain: str = "tiny", **params: Any) -> dict[str, Any]:
    response = server.post(
        f"/v1/domains/{domain}/predict",
        files={"image": ("x.jpg", jpeg(colour, seed=7), "image/jpeg")},
        params=params,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_predict_multipart_and_base64_json(server: Server) -> None:
    for colour in ("red", "green", "blue"):
        answer = predict(server, colour)
        assert answer["predictions"][0]["label"] == colour
        assert answer["predictions"][0]["display_name"] == colour.title()
        assert answer["domain"] == "tiny" and answer["version"] == 1 and answer["variant"] == "int8"
        assert 0.99 < sum(p["probability"] for p in answer["predictions"]) <= 1.0001
        assert answer["unknown"] is False and answer["unknown_method"] == "knn_residual"
        assert answer["unknown_score"] >= answer["unknown_threshold"] == 0.0
        assert {"decode", "queue", "inference"} <= set(answer["timings_ms"])
    encoded = base64.b64encode(jpeg("green", seed=11)).decode()
    answer = server.post("/v1/domains/tiny/predict", json={"image": encoded, "top_k": 2}).json()
    assert answer["predictions"][0]["label"] == "green" and len(answer["predictions"]) == 2
    assert len(predict(server, "red", top_k=1)["predictions"]) == 1


def test_batch_and_its_limit(server: Server) -> None:
    colours = ["red", "green", "blue", "red"]
    files = [("images", (f"{i}.jpg", jpeg(c, seed=20 + i), "image/jpeg")) for i, c in enumerate(colours)]
    results = server.post("/v1/domains/tiny/predict/batch", files=files).json()["results"]
    assert [r["predictions"][0]["label"] for r in results] == colours
    encoded = [base64.b64encode(jpeg(c, seed=40 + i)).decode() for i, c in enumerate(colours)]
    results = server.post("/v1/domains/tiny/predict/batch", json={"images": encoded}).json()["results"]
    assert [r["predictions"][0]["label"] for r in results] == colours
    too_many = server.post("/v1/domains/tiny/predict/batch", json={"images": encoded * 5})
    assert_error(too_many, 413, "payload_too_large")


def test_explain_returns_a_heatmap_overlay(server: Server) -> None:
    from PIL import Image

    answer = predict(server, "red", explain="true")
    png = base64.b64decode(answer["heatmap_png"])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (32, 32)  # the crop the model saw
    no_heatmaps = server.post(
        "/v1/domains/duo/predict", files={"image": jpeg("red")}, params={"explain": "true"}
    )
    assert_error(no_heatmaps, 409, "explain_not_available")


def test_the_packages_unknown_score_and_threshold_are_what_the_server_applies(
    server: Server, api_registry: Any
) -> None:
    """The feature scores shipped in calibration.json (the k-NN score reads two earlier stages too),
    computed from the serving backend's own run (int8 here): the same margin as the package gives
    offline, under the thresholds the package ships (set to SHIPPED_THRESHOLDS in tiny v1): a photo
    unlike every training photo is flagged, our colours are not."""
    import json

    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from thali.core.inference import Preprocessor
    from thali.core.inference.unknown import load_spec

    folder = api_registry / "tiny" / "versions" / "1"
    score = load_spec(json.loads((folder / "calibration.json").read_text()))
    assert score is not None
    preprocess = Preprocessor(json.loads((folder / "preprocess.json").read_text()))
    session = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    y, x = np.mgrid[0:36, 0:44]
    board = io.BytesIO()
    Image.fromarray(np.stack([((x // 3 + y // 3) % 2 * 255).astype(np.uint8)] * 3, -1)).save(board, "PNG")
    photos = {"red": jpeg("red", seed=3), "blue": jpeg("blue", seed=4), "checkerboard": board.getvalue()}
    for name, data in photos.items():
        response = server.post("/v1/domains/tiny/predict", files={"image": (f"{name}.png", data)})
        answer = response.json()
        features, stages = session.run(["features", "stage_features"], {"input": preprocess(data)[None]})
        assert answer["unknown_method"] == "knn_residual", answer
        assert (score.knn_threshold, score.residual_threshold) == SHIPPED_THRESHOLDS
        assert answer["unknown_threshold"] == 0.0  # on the margin over both
        margin = score.scores(features, stages)[0]
        assert answer["unknown_score"] == pytest.approx(float(margin), abs=1e-4)
        assert answer["unknown"] is (name == "checkerboard"), (name, answer)


def test_two_domains_in_one_process(server: Server) -> None:
    listing = server.get("/v1/domains").json()
    served = {d["domain"]: d for d in listing["domains"]}
    assert set(served) == {"tiny", "duo"}
    tiny, duo = served["tiny"], served["duo"]
    assert tiny["version"] == 1 and tiny["ref"] == "production" and tiny["aliases"] == ["production"]
    assert duo["version"] == 1 and duo["ref"] == "latest"  # no production alias: its latest version
    assert tiny["explain"] and not duo["explain"]
    assert tiny["provider"] == "CPUExecutionProvider" and tiny["backend"] == "onnxruntime"
    assert [c["name"] for c in duo["classes"]] == ["blue", "red"] and tiny["metrics"]["top1"] == 1.0
    assert tiny["licence"]
    assert predict(server, "blue", domain="duo")["predictions"][0]["label"] == "blue"
    assert server.get("/v1/domains/duo").json()["domain"] == "duo"
    assert "broken" in listing["not_loaded"] and "checksum" in listing["not_loaded"]["broken"]
    log = server.log.read_text()
    assert "serving tiny v1 (production)" in log and "serving duo v1 (latest)" in log


def test_a_damaged_package_is_never_served_and_readyz_says_why(server: Server) -> None:
    ready = server.get("/readyz")
    assert ready.status_code == 503
    domains = ready.json()["domains"]
    assert domains["tiny"]["ready"] and domains["duo"]["ready"]
    assert not domains["broken"]["ready"] and "does not match its checksum" in domains["broken"]["error"]
    assert_error(server.post("/v1/domains/broken/predict", files={"image": jpeg("red")}), 503, "unavailable")
    assert server.get("/healthz").json() == {"status": "ok"}


def test_a_repeated_image_is_answered_from_the_cache(server: Server) -> None:
    image = jpeg("blue", seed=99)
    first = server.post("/v1/domains/tiny/predict", files={"image": image}).json()
    second = server.post("/v1/domains/tiny/predict", files={"image": image}).json()
    assert not first["cached"] and second["cached"]
    assert second["predictions"] == first["predictions"]


def _bomb_png() -> bytes:
    """A PNG that declares 13,300 x 13,300 pixels in a few KB (never decoded here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 13300, 13300, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 2000))
        + chunk(b"IEND", b"")
    )


def test_bad_input_gets_the_error_body_and_the_server_keeps_answering(server: Server) -> None:
    good = jpeg("red")
    cases = [
        (server.post("/v1/domains/tiny/predict", files={"image": b""}), 415, "not_an_image"),
        (server.post("/v1/domains/tiny/predict", files={"image": b"plain text"}), 415, "not_an_image"),
        (
            server.post("/v1/domains/tiny/predict", files={"image": good[: len(good) // 2]}),
            400,
            "invalid_image",
        ),
        (server.post("/v1/domains/tiny/predict", files={"image": _bomb_png()}), 413, "image_too_large"),
        (server.post("/v1/domains/tiny/predict", files={"image": b"\xff" * (301 * 1024)}), 413, None),
        (server.post("/v1/domains/tiny/predict", data=b"x" * (80 * 1024 * 1024)), 413, None),
        (server.post("/v1/domains/nope/predict", files={"image": good}), 404, "not_found"),
        (server.post("/v1/domains/tiny/predict", files={"image": good}, params={"top_k": 0}), 422, None),
        (server.post("/v1/domains/tiny/predict", files={"image": good}, params={"top_k": "abc"}), 422, None),
        (server.post("/v1/domains/tiny/predict", files={"picture": good}), 422, None),
        (server.post("/v1/domains/tiny/predict", json={"image": "not base64!"}), 422, None),
        (server.post("/v1/domains/tiny/predict", json={"img": "AAAA"}), 422, None),
        (server.post("/v1/domains/tiny/predict", json=[1, 2]), 422, None),
        (
            server.post("/v1/domains/tiny/predict", data="{", headers={"Content-Type": "application/json"}),
            400,
            None,
        ),
        (
            server.post("/v1/domains/tiny/predict", data=good, headers={"Content-Type": "image/jpeg"}),
            415,
            None,
        ),
        (server.get("/v1/domains/tiny/predict"), 405, None),
        (server.get("/v1/nothing"), 404, None),
    ]
    for response, status, code in cases:
        assert_error(response, status, code)
    assert predict(server, "red")["predictions"][0]["label"] == "red"


NAMES = [
    "..",
    "%2e%2e",
    "%2E%2E%2Fetc",
    "*",
    "t*",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "file:%2F%2F%2Fetc",
    "s3:x",
    "TINY",
]


def test_names_from_requests_never_become_paths(server: Server) -> None:
    for name in NAMES:
        responses = [
            server.get(f"/v1/domains/{name}"),
            server.post(f"/v1/domains/{name}/predict", files={"image": jpeg("red")}),
            server.post(f"/v1/domains/{name}/predict/batch", files={"images": jpeg("red")}),
            server.admin("PUT", f"/v1/domains/{name}", json={"ref": "production"}),
            server.admin("DELETE", f"/v1/domains/{name}"),
            server.admin("POST", f"/v1/domains/{name}/reload"),
            server.admin("PUT", "/v1/domains/tiny", json={"ref": name.replace("%2F", "/")}),
            server.admin("PUT", "/v1/domains/tiny", json={"ref": "production", "variant": name}),
        ]
        for response in responses:
            assert response.status_code in (400, 404, 405, 422), (name, response.request.url, response.text)
            assert set(response.json()) == ERROR_KEYS
    assert server.get("/v1/domains/tiny").json()["version"] == 1


def test_admin_key_missing_wrong_right(server: Server) -> None:
    assert_error(server.admin("POST", "/v1/domains/duo/reload", key=None), 401, "unauthorized")
    assert_error(server.admin("POST", "/v1/domains/duo/reload", key="wrong"), 403, "forbidden")
    reloaded = server.admin("POST", "/v1/domains/duo/reload")
    assert reloaded.status_code == 200 and reloaded.json()["version"] == 1
    assert server.admin("DELETE", "/v1/domains/duo").status_code == 204
    assert_error(server.post("/v1/domains/duo/predict", files={"image": jpeg("red")}), 404, "not_found")
    loaded = server.admin("PUT", "/v1/domains/duo", json={"ref": "1"})
    assert loaded.status_code == 200 and loaded.json()["ref"] == "1"
    assert predict(server, "red", domain="duo")["predictions"][0]["label"] == "red"
    assert_error(server.admin("PUT", "/v1/domains/duo", json={"ref": "9"}), 404, "not_found")


def test_hot_swap_under_load_drops_no_request(server: Server) -> None:
    stop, results, lock = threading.Event(), [], threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        for i in range(400):  # bounded; stops earlier when the swaps are done
            if stop.is_set():
                break
            image = jpeg(("red", "green", "blue")[i % 3], seed=10_000 * (n + 1) + i)  # never cached
            try:
                r = session.post(f"{server.url}/v1/domains/tiny/predict", files={"image": image}, timeout=30)
                outcome = (r.status_code, r.json().get("version"))
            except requests.RequestException as exc:
                outcome = (0, repr(exc))
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    swaps = [
        server.admin("PUT", "/v1/domains/tiny", json={"ref": "2"}),
        server.admin("PUT", "/v1/domains/tiny", json={"ref": "1"}),
        server.admin("PUT", "/v1/domains/tiny", json={"ref": "2"}),
        server.admin("PUT", "/v1/domains/tiny", json={"ref": "production"}),
    ]
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert [s.status_code for s in swaps] == [200] * 4
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 50 and not failed, failed[:5]
    assert {v for _, v in results} == {1, 2}  # both versions answered while they were swapped
    assert server.get("/v1/domains/tiny").json()["version"] == 1


def test_metrics_counters_move(server: Server) -> None:
    before = server.get("/metrics").text
    image = jpeg("green", seed=1234)
    for _ in range(3):
        server.post("/v1/domains/tiny/predict", files={"image": image})
    after = server.get("/metrics").text
    assert (
        metric_value(after, "thali_requests_total", domain="tiny", status="200")
        >= metric_value(before, "thali_requests_total", domain="tiny", status="200") + 3
    )
    assert (
        metric_value(after, "thali_cache_total", domain="tiny", result="hit")
        >= metric_value(before, "thali_cache_total", domain="tiny", result="hit") + 2
    )
    assert metric_value(after, "thali_predictions_total", domain="tiny", label="green") > metric_value(
        before, "thali_predictions_total", domain="tiny", label="green"
    )
    for name in ("thali_batch_size_count", "thali_queue_wait_seconds_count", "thali_top1_confidence_count"):
        assert metric_value(after, name, domain="tiny") > 0, name
    assert re.search(r'thali_model_loaded\{.*domain="tiny".*\} 1\.0', after)


def test_openapi_spec_is_valid_and_swagger_ui_is_served(server: Server) -> None:
    from openapi_spec_validator import validate

    spec = server.get("/openapi.json").json()
    validate(spec)
    paths = set(spec["paths"])
    assert {"/v1/domains", "/v1/domains/{domain}", "/v1/domains/{domain}/predict"} <= paths
    assert {
        "/v1/domains/{domain}/predict/batch",
        "/v1/domains/{domain}/reload",
        "/healthz",
        "/readyz",
    } <= paths
    assert {"/metrics", "/v1/plugins"} <= paths
    predict_body = spec["paths"]["/v1/domains/{domain}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(predict_body)
    docs = server.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert server.get("/docs/static/swagger-ui-bundle.js").status_code == 200  # offline, no CDN


def test_plugins_endpoint_matches_the_cli(server: Server) -> None:
    import json

    from helpers import thali_in_process

    served = server.get("/v1/plugins").json()
    cli = json.loads(thali_in_process("plugins", "--json").stdout)
    assert [p["name"] for p in served["plugins"]] == [p["name"] for p in cli["plugins"]]
    names = {c["name"] for c in served["components"]["serving_backends"]}
    assert {"onnxruntime", "torch"} <= names


@pytest.mark.slow
def test_schemathesis_all_checks_find_nothing(api_registry: Any, tmp_path: Any) -> None:
    """Property-based requests from the spec, with every schemathesis check on (server errors, status
    codes, content types, response headers and schemas, schema-valid requests accepted and invalid
    ones rejected, the Allow header of a 405, auth ...), against a server of the healthy domains (the
    damaged one answers 503 by design, tested above). tests/api/schemathesis.toml turns one check off
    for one route and says why; schemathesis_hooks.py gives it real images for the image parts."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from api_support import ADMIN_KEY, jpeg, start_server, stop_server

    feedback_key = "feedback-key-of-the-schemathesis-run"

    server = start_server(
        api_registry, tmp_path / "serve.log",
        {
            "THALI_CACHE": str(tmp_path / "cache"),
            "THALI_FEEDBACK": str(tmp_path / "feedback"),
            "THALI_feedback_key": feedback_key,
        },
        "--domain", "tiny", "--domain", "duo",
    )  # fmt: skip
    here = Path(__file__).parent
    try:
        stored = server.post(
            "/v1/domains/tiny/feedback",
            files={"image": ("r.jpg", jpeg("red"))},
            data={"label": "red"},
            headers={"X-Feedback-Key": feedback_key},
        )
        assert stored.status_code == 201, stored.text
        st = Path(sys.executable).parent / "schemathesis"
        if not st.exists():
            st = Path(shutil.which("schemathesis") or "schemathesis")
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": str(here),
            "THALI_TEST_FEEDBACK_SHA": stored.json()["image_sha256"],
        }
        result = subprocess.run(
            [
                str(st), "--config-file", str(here / "schemathesis.toml"),
                "run", f"{server.url}/openapi.json",
                "--max-examples", "30", "--workers", "1", "--request-timeout", "20",
                "--exclude-path", "/metrics", "--seed", "1", "--no-color", "-H", f"X-API-Key: {ADMIN_KEY}",
                "-H", f"X-Feedback-Key: {feedback_key}",
            ],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        if "no issues found" not in output.lower():
            # the warnings allowed: feedback labels must be classes of the domain, which one spec for
            # every domain cannot list, so schemathesis sees many 422s there (its checks all pass) ...
            import re

            warned = set(re.findall(r"^\s+- ((?:GET|POST|PUT|DELETE|PATCH) /\S+)", output, re.MULTILINE))
            assert "schema validation mismatch" in output.lower(), output[-2000:]
            # and the OIP's infer: a tensor's data must fit its shape and datatype, BYTES must be images
            infer = {"POST /v2/models/{model}/infer", "POST /v2/models/{model}/versions/{version}/infer"}
            assert warned and warned <= {"POST /v1/domains/{domain}/feedback", *infer}, output[-2000:]
        assert server.get("/healthz").status_code == 200  # (the admin calls may have unloaded domains)
    finally:
        stop_server(server)


def test_import_api_and_predict_without_torch(api_registry: Any, tmp_path: Any) -> None:
    """A server process that serves ONNX models never imports torch (nor albumentations, timm)."""
    import subprocess
    import sys

    from api_support import jpeg

    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg("red"))
    script = f"""
import sys
from thali.api import Settings, create_app
app = create_app(Settings(registry={str(api_registry)!r}, domains=["tiny"], cache_entries=0))
client = app.test_client()
with open({str(image)!r}, "rb") as handle:
    answer = client.post("/v1/domains/tiny/predict", data={{"image": (handle, "red.jpg")}}).get_json()
assert answer["predictions"][0]["label"] == "red", answer
print(sorted(m for m in ("torch", "albumentations", "timm", "torchvision") if m in sys.modules))
"""
    env = {"THALI_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
