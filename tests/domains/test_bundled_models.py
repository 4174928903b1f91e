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
        assert package.card["dataset"]["licence"] and package.card["dataset"]["fingerprint"]
        for variant in package.variants:  # every optimised variant shipped passed its accuracy gate
            assert variant == "fp32" or package.card["metrics"][variant]["gate"]["passed"], (domain, variant)
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
