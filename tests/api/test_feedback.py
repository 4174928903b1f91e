"""Feedback (issue 28) against a real ``thali serve`` with a feedback store: corrections by photo and by
``image_sha256``, the list and the photo routes, the metrics; and the attacks: labels that are not
classes, paths and globs in every field, an oversize note, one photo sent 1,000 times, a full store,
a missing or wrong key, a store on moto S3. Nothing is written outside the store, and the server keeps
answering."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from api_support import Server, jpeg, start_server, stop_server

FEEDBACK = "/v1/domains/tiny/feedback"
KEY = "a-feedback-key-for-the-tests"
ERROR_KEYS = {"code", "status", "message", "errors"}


def _error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:400])
    body = response.json()
    assert set(body) == ERROR_KEYS and body["status"] == status, body
    return body


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def feedback_server(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("feedback")
    env = {
        "THALI_CACHE": str(folder / "cache"),
        "THALI_FEEDBACK": str(folder / "store"),
        "THALI_FEEDBACK_KEY": KEY,
        "THALI_FEEDBACK_MAX_BYTES": str(2 * 1024 * 1024),
    }
    running = start_server(api_registry, folder / "serve.log", env)
    running.folder = folder  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        stop_server(running)


def _send(server: Server, key: str | None = KEY, **fields: Any) -> requests.Response:
    headers = {"X-Feedback-Key": key} if key else {}
    photo = fields.pop("photo", None)
    files = {"image": ("p.jpg", photo, "image/jpeg")} if photo is not None else None
    if files:
        return server.post(FEEDBACK, files=files, data=fields, headers=headers)
    return server.post(FEEDBACK, json=fields, headers=headers)


def test_a_correction_is_stored_with_the_models_answer_and_counted(feedback_server: Server) -> None:
    server = feedback_server
    assert server.get("/v1/domains/tiny").json()["feedback"] is True
    photo = jpeg("blue", seed=41)
    answer = server.post("/v1/domains/tiny/predict", files={"image": ("b.jpg", photo)}).json()
    said = answer["predictions"][0]["label"]
    wrong = "green" if said != "green" else "red"
    stored = _send(server, photo=photo, label=wrong, note="the plate is green, not blue")
    assert stored.status_code == 201, stored.text
    record = stored.json()
    sha = hashlib.sha256(photo).hexdigest()
    assert record["image_sha256"] == sha and record["label"] == wrong and record["answer_label"] == said
    assert record["model_version"] == answer["version"] and record["variant"] == answer["variant"]
    assert record["agreed"] is False and record["format"] == "JPEG"
    # by image_sha256 of the photo the server just answered: no upload again
    again = _send(server, image_sha256=sha, label=said)
    assert again.status_code == 201 and again.json()["agreed"] is True, again.text
    listed = server.get(FEEDBACK, headers={"X-Feedback-Key": KEY}).json()
    assert listed["counts"][wrong]["corrected"] >= 1 and listed["counts"][said]["agreed"] >= 1
    assert listed["records"][0]["id"] == again.json()["id"]  # newest first
    got = server.get(f"{FEEDBACK}/photos/{sha}", headers={"X-Feedback-Key": KEY})
    assert got.status_code == 200 and got.content == photo and got.headers["Content-Type"] == "image/jpeg"
    metrics = server.get("/metrics").text
    assert f'thali_feedback_total{{domain="tiny",label="{wrong}",outcome="corrected"}}' in metrics
    store = server.folder / "store" / "tiny"  # type: ignore[attr-defined]
    assert (store / "photos" / f"{sha}.jpg").read_bytes() == photo
    lines = [json.loads(p.read_text()) for p in (store / "records").iterdir()]
    assert {r["note"] for r in lines} >= {"the plate is green, not blue"}


def test_bad_labels_paths_globs_and_notes_are_422_and_write_nothing(feedback_server: Server) -> None:
    server = feedback_server
    store = server.folder / "store"  # type: ignore[attr-defined]
    photo = jpeg("red", seed=42)
    before = _files(server.folder)  # type: ignore[attr-defined]
    for label in ("purple", "../../../etc/passwd", "red/../../x", "*", "red*", "/tmp/x", "", "r" * 101):
        _error(_send(server, photo=photo, label=label), 422)
    for sha in ("../../etc/passwd", "*", "a" * 63, "A" * 64, f"{'a' * 64}/../x"):
        _error(_send(server, image_sha256=sha, label="red"), 422)
    _error(_send(server, image_sha256="a" * 64, label="red"), 404)  # a sha it never answered
    _error(_send(server, photo=photo, label="red", note="n" * 501), 422)
    _error(_send(server, label="red"), 422)  # no photo at all
    _error(server.get("/v1/domains/tiny/feedback/photos/..%2F..%2Fetc", headers={"X-Feedback-Key": KEY}), 404)
    _error(server.get(f"/v1/domains/tiny/feedback/photos/{'b' * 64}", headers={"X-Feedback-Key": KEY}), 404)
    _error(
        server.post("/v1/domains/..%2Fx/feedback", json={"label": "red"}, headers={"X-Feedback-Key": KEY}),
        404,
    )
    _error(
        server.post("/v1/domains/nope/feedback", json={"label": "red"}, headers={"X-Feedback-Key": KEY}), 404
    )
    assert _files(server.folder) == before  # type: ignore[attr-defined]
    # a note that looks like a path or a glob is text in the record, never a path
    ok = _send(server, photo=photo, label="red", note="../../../../tmp/owned *.jpg")
    assert ok.status_code == 201, ok.text
    new = _files(server.folder) - before  # type: ignore[attr-defined]
    assert new and all(store in p.parents for p in new), new
    assert not Path("/tmp/owned").exists()


def test_the_key_is_checked_before_the_body(feedback_server: Server) -> None:
    server = feedback_server
    _error(_send(server, key=None, photo=jpeg("red"), label="red"), 401)
    _error(_send(server, key="not-the-key", photo=jpeg("red"), label="red"), 403)
    _error(server.get(FEEDBACK), 401)
    _error(server.get(FEEDBACK, headers={"X-Feedback-Key": "x" * 40}), 403)
    # 401 although the body is over the route's limit: refused before a byte of it is read
    huge = {"Content-Type": "application/json", "Content-Length": str(400 * 1024 * 1024)}
    with requests.Session() as session:
        response = session.post(server.url + FEEDBACK, headers=huge, data=b"{}", timeout=30)
    assert response.status_code in (401, 413), response.text


def test_one_photo_sent_a_thousand_times_is_stored_once(feedback_server: Server) -> None:
    server = feedback_server
    photo = jpeg("green", seed=43)
    sha = hashlib.sha256(photo).hexdigest()
    with requests.Session() as session:
        for i in range(1000):
            response = session.post(
                server.url + FEEDBACK,
                files={"image": ("g.jpg", photo, "image/jpeg")},
                data={"label": "green"},
                headers={"X-Feedback-Key": KEY},
                timeout=30,
            )
            assert response.status_code == 201, (i, response.text)
    photos = server.folder / "store" / "tiny" / "photos"  # type: ignore[attr-defined]
    assert [p.name for p in photos.iterdir() if p.name.startswith(sha)] == [f"{sha}.jpg"]
    listed = server.get(FEEDBACK, params={"limit": 5}, headers={"X-Feedback-Key": KEY}).json()
    assert listed["total"] >= 1000 and len(listed["records"]) == 5
    assert server.post("/v1/domains/tiny/predict", files={"image": ("r.jpg", jpeg("red"))}).status_code == 200


def test_a_full_store_is_507_and_the_server_keeps_answering(api_registry: Path, tmp_path: Path) -> None:
    env = {
        "THALI_CACHE": str(tmp_path / "cache"),
        "THALI_FEEDBACK": str(tmp_path / "store"),
        "THALI_FEEDBACK_MAX_RECORDS": "3",
        "THALI_FEEDBACK_MAX_BYTES": "4096",
    }
    server = start_server(api_registry, tmp_path / "serve.log", env)
    try:
        small = jpeg("red", (16, 12), seed=1)
        assert len(small) < 4096
        assert (
            server.post(FEEDBACK, files={"image": ("a.jpg", small)}, data={"label": "red"}).status_code == 201
        )
        big = jpeg("blue", (120, 90), seed=2)
        assert len(small) + len(big) > 4096
        body = _error(server.post(FEEDBACK, files={"image": ("b.jpg", big)}, data={"label": "blue"}), 507)
        assert "limit of 4,096" in body["message"]
        for _ in range(2):  # the same small photo: no new bytes, two more records (3 in all)
            assert (
                server.post(FEEDBACK, files={"image": ("a.jpg", small)}, data={"label": "red"}).status_code
                == 201
            )
        body = _error(server.post(FEEDBACK, files={"image": ("a.jpg", small)}, data={"label": "red"}), 507)
        assert "3 records" in body["message"]
        assert len(list((tmp_path / "store" / "tiny" / "records").iterdir())) == 3
        assert (
            server.post("/v1/domains/tiny/predict", files={"image": ("r.jpg", jpeg("red"))}).status_code
            == 200
        )
    finally:
        stop_server(server)


def test_feedback_off_is_a_404_and_the_domain_says_so(server: Server) -> None:
    assert server.get("/v1/domains/tiny").json()["feedback"] is False
    body = _error(server.post(FEEDBACK, files={"image": ("r.jpg", jpeg("red"))}, data={"label": "red"}), 404)
    assert "THALI_FEEDBACK" in body["message"]


def test_a_store_on_moto_s3_and_its_export(s3_endpoint: dict[str, Any], tmp_path: Path) -> None:
    """The store on S3 (moto's server): one copy per photo, records listed newest first, and
    `thali feedback export` writes the ImageFolder + manifest.csv and the none_of_these folder."""
    from thali.registry.feedback import FeedbackStore

    url = f"s3://models/feedback-{uuid.uuid4().hex}"
    options = {"endpoint_url": s3_endpoint["endpoint_url"]}
    store = FeedbackStore(url, storage_options=options)
    red, blue = jpeg("red", seed=7), jpeg("blue", seed=8)
    base = {"model_version": 1, "variant": "fp32", "answer_label": "red", "answer_probability": 0.9}
    store.add("tiny", red, "JPEG", {**base, "label": "red", "agreed": True, "note": None})
    store.add("tiny", red, "JPEG", {**base, "label": "green", "agreed": False, "note": None})
    store.add("tiny", blue, "JPEG", {**base, "label": "none_of_these", "agreed": False, "note": None})
    assert len(store.fs.ls(f"{url}/tiny/photos")) == 2
    records = FeedbackStore(url, storage_options=options).records("tiny")
    assert [r["label"] for r in records] == ["none_of_these", "green", "red"]
    env = {**os.environ, **s3_endpoint["env"], "THALI_FEEDBACK_OPTIONS": json.dumps(options)}
    out = tmp_path / "corrections"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "thali.core.cli",
            "feedback",
            "export",
            "tiny",
            "--store",
            url,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    red_sha, blue_sha = hashlib.sha256(red).hexdigest(), hashlib.sha256(blue).hexdigest()
    assert (out / "green" / f"{red_sha}.jpg").read_bytes() == red  # the newest label of the photo
    assert (tmp_path / "corrections_ood" / f"{blue_sha}.jpg").read_bytes() == blue
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows[0] == "file,class,source_repo,model_version,record"
    assert rows[1].startswith(f"green/{red_sha}.jpg,green,feedback:{url},1,")
