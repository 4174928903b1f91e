"""A package whose unknown score reads earlier stages (``stage_features``), served by a third-party
backend that gives only what the contract always asked for (``logits`` and ``features``): the server
says so once and flags with the top probability, instead of failing every request."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from api_support import jpeg

from thali.api import Settings, create_app


class FeaturesOnly:
    """A serving backend written before ``stage_features`` existed: ONNX Runtime, two outputs."""

    def __init__(self, model_path: str | Path, **_: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def predict(self, batch: Any) -> Any:
        return self.session.run(["logits"], {"input": batch})[0]

    def infer(self, batch: Any, cam: bool = False) -> dict[str, Any]:
        logits, features = self.session.run(["logits", "features"], {"input": batch})
        return {"logits": logits, "features": features}

    def info(self) -> dict[str, Any]:
        return {"backend": "features_only", "variant": "fp32", "provider": "CPU", "explain": False}


@pytest.mark.parametrize("backend", ["onnxruntime", "features_only"])
def test_a_backend_without_stage_features_falls_back_to_the_top_probability(
    backend: str, tmp_path: Path, tiny_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from thali.core import build_plugin_manager
    from thali.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "publisher")
    registry.publish(tiny_export, aliases=["production"])
    plugins = build_plugin_manager()
    plugins.registries.serving_backends.add("features_only", FeaturesOnly, description="test backend")
    settings = Settings(registry=str(tmp_path / "registry"), backend=backend, variant="fp32", cache_entries=0)
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, plugins)
    hosting = app.extensions["thali"].hosting
    try:
        response = app.test_client().post(
            "/v1/domains/tiny/predict", data={"image": (io.BytesIO(jpeg("red")), "red.jpg")}
        )
        answer = response.get_json()
        assert response.status_code == 200 and answer["predictions"][0]["label"] == "red"
        warned = [r.getMessage() for r in caplog.records if "stage_features" in r.getMessage()]
        if backend == "onnxruntime":
            assert answer["unknown_method"] == "knn_residual" and not warned
        else:
            assert answer["unknown_method"] == "max_probability"
            assert warned == [
                "tiny v1: backend features_only gives no stage_features, so the unknown flag uses the "
                "top probability"
            ]
    finally:
        hosting.close()


class Declared:
    """A backend of the current contract: ``run`` + declared ``capabilities``; it counts its runs."""

    runs = 0

    def __init__(self, model_path: str | Path, *, capabilities: frozenset[str], **_: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.capabilities = capabilities

    def run(self, batch: Any, outputs: frozenset[str]) -> dict[str, Any]:
        Declared.runs += 1
        names = ["logits", *sorted(outputs)]
        return dict(zip(names, self.session.run(names, {"input": batch}), strict=True))

    def info(self) -> dict[str, Any]:
        return {"backend": "declared", "variant": "fp32", "provider": "CPU", "explain": False}


@pytest.mark.parametrize(
    ("capabilities", "method"),
    [
        (frozenset({"features"}), "max_probability"),
        (frozenset({"features", "stage_features"}), "knn_residual"),
    ],
)
def test_what_a_backend_gives_is_known_from_its_declared_capabilities_not_a_probe_run(
    capabilities: frozenset[str],
    method: str,
    tmp_path: Path,
    tiny_export: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from functools import partial

    from thali.core import build_plugin_manager
    from thali.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "publisher")
    registry.publish(tiny_export, aliases=["production"])
    plugins = build_plugin_manager()
    factory = partial(Declared, capabilities=capabilities)
    plugins.registries.serving_backends.add("declared", factory, description="test backend")
    settings = Settings(
        registry=str(tmp_path / "registry"), backend="declared", variant="fp32", cache_entries=0, warmup=False
    )
    Declared.runs = 0
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, plugins)
    hosting = app.extensions["thali"].hosting
    try:
        model = hosting.get("tiny")
        assert Declared.runs == 0  # loaded, planned, not run: nothing was probed
        assert (model.unknown is not None) == (method == "knn_residual")
        warned = [r.getMessage() for r in caplog.records if "gives no" in r.getMessage()]
        assert warned == ([] if method == "knn_residual" else [
            "tiny v1: backend declared gives no stage_features, so the unknown flag uses the top probability"
        ])  # fmt: skip
        response = app.test_client().post(
            "/v1/domains/tiny/predict", data={"image": (io.BytesIO(jpeg("red")), "red.jpg")}
        )
        assert response.status_code == 200 and response.get_json()["unknown_method"] == method
        assert Declared.runs == 1
    finally:
        hosting.close()
