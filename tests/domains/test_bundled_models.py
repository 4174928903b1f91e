"""The bundled registry (``models/``) that ``make run`` serves: verified, within its size budget, and
recognising real dish photos through a real ``thali serve``."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_support import start_server, stop_server
from helpers import REPO

from thali.registry import ModelRegistry

MODELS = REPO / "models"
BUDGET = 20 * 1024 * 1024


def _registry(tmp_path: Path) -> ModelRegistry:
    if not (MODELS / "south_asian_food").is_dir():
        pytest.skip(
            "no bundled south_asian_food model in models/ (python benchmarks/build_bundled_models.py)"
        )
    return ModelRegistry(MODELS, cache_dir=tmp_path / "cache")


def test_bundled_models_verify_and_fit_the_budget(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    for domain in registry.domains():
        package = registry.resolve(domain, "production")  # every file against its sha256
        assert sum(p.stat().st_size for p in package.files.values()) <= BUDGET, domain
        manifest = package.manifest
        assert manifest.format == 2 and manifest.licence != "not stated" and manifest.dataset.fingerprint
        for variant in package.variants:  # every optimised variant shipped passed its accuracy gate
            gate = manifest.variants[variant].gate
            assert variant == "fp32" or (gate is not None and gate.passed), (domain, variant)
    assert {"south_asian_food", "plant_disease"} <= set(registry.domains())
    assert "int8" in registry.resolve("south_asian_food", "production").variants
    assert (MODELS / "README.md").is_file()


@pytest.mark.data
def test_the_bundled_models_answer_real_photos(tmp_path: Path, datasets_root: Path) -> None:
    _registry(tmp_path)
    server = start_server(MODELS, tmp_path / "serve.log", {"THALI_CACHE": str(tmp_path / "cache")})
    try:
        right = 0
        dishes = ["biryani", "dosa", "momo", "jalebi", "samosa", "idli"]
        for dish in dishes:
            photo = sorted((datasets_root / "south_asian_food" / dish).glob("*.jp*g"))[-1]
            answer = server.post("/v1/domains/south_asian_food/predict", files={"image": photo.read_bytes()})
            assert answer.status_code == 200, answer.text
            labels = [p["label"] for p in answer.json()["predictions"]]
            right += labels[0] == dish
            assert dish in labels, (dish, labels)  # top-5
        assert right >= len(dishes) - 1
        for disease in ("potato_early_blight", "potato_healthy", "potato_late_blight"):
            leaf = sorted((datasets_root / "plant_disease" / disease).glob("*.jpg"))[-1]
            answer = server.post("/v1/domains/plant_disease/predict", files={"image": leaf.read_bytes()})
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["label"] == disease, leaf
    finally:
        stop_server(server)


RECORDED = Path(__file__).with_name("bundled_predictions.json")


def _probe_images() -> list[tuple[str, bytes]]:
    """Four photos-to-be, made here from a seeded generator: smooth colour fields with noise, of the
    sizes and formats people send (square PNG, wide JPEG, tall JPEG, small WebP)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(26)
    out = []
    for name, (w, h), fmt in (
        ("square.png", (300, 300), "PNG"),
        ("wide.jpg", (640, 360), "JPEG"),
        ("tall.jpg", (300, 533), "JPEG"),
        ("small.webp", (120, 90), "WEBP"),
    ):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(80, 255, 3)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, **({} if fmt == "PNG" else {"quality": 90}))
        out.append((name, buf.getvalue()))
    return out


def test_the_bundled_models_answer_as_recorded(tmp_path: Path) -> None:
    """What the API answers for fixed images on the bundled models, byte for byte (labels, probabilities,
    the unknown flag and score, version and variant): a refactoring of export, registry or serving must
    not move it. After rebuilding the bundled models, record again with THALI_RECORD=1."""
    import json
    import os

    _registry(tmp_path)
    server = start_server(MODELS, tmp_path / "serve.log", {"THALI_CACHE": str(tmp_path / "cache")})
    try:
        answers: dict[str, dict[str, object]] = {}
        for domain in ("south_asian_food", "plant_disease"):
            for name, data in _probe_images():
                reply = server.post(f"/v1/domains/{domain}/predict", files={"image": (name, data)})
                assert reply.status_code == 200, reply.text
                body = reply.json()
                keep = ("predictions", "unknown", "unknown_score", "unknown_threshold", "version", "variant")
                answers[f"{domain}/{name}"] = {k: body[k] for k in keep}
    finally:
        stop_server(server)
    text = json.dumps(answers, indent=1, sort_keys=True) + "\n"
    if os.environ.get("THALI_RECORD") == "1":
        RECORDED.write_text(text)
    assert RECORDED.is_file(), f"no {RECORDED.name}: record it with THALI_RECORD=1"
    if text != RECORDED.read_text():  # on this machine they are byte-identical; another CPU's ONNX
        # Runtime kernels may move the sixth decimal the API rounds to, and nothing else
        _same(answers, json.loads(RECORDED.read_text()), "answers")


def _same(got: object, recorded: object, where: str) -> None:
    """Equal, floats within 1e-5 (a few units of the API's sixth decimal)."""
    if isinstance(recorded, float) and isinstance(got, float):
        assert abs(got - recorded) <= 1e-5, (where, got, recorded)
    elif isinstance(recorded, dict) and isinstance(got, dict):
        assert sorted(got) == sorted(recorded), (where, sorted(got), sorted(recorded))
        for key in recorded:
            _same(got[key], recorded[key], f"{where}/{key}")
    elif isinstance(recorded, list) and isinstance(got, list):
        assert len(got) == len(recorded), where
        for i, (a, b) in enumerate(zip(got, recorded, strict=True)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert got == recorded, (where, got, recorded)
