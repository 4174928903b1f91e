"""The model manifest (``card.json``): one typed model from export to UI.

A package of the format before the manifest (format 1, the bundled models as they shipped) still loads
and serves; what ``thali export --set serving.*`` says is what the server does; no card holds a folder
of the machine that made it; a hostile card is one line naming the field."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from api_support import jpeg
from helpers import REPO

from thali.core.errors import IntegrityError
from thali.core.manifest import FORMAT, Manifest, read_manifest

FORMAT1 = Path(__file__).parents[1] / "fixtures" / "manifest_format1"
BUNDLED = REPO / "models"
#: an absolute path of any machine: /home/..., C:\..., \\server\share, ~/...
ABSOLUTE = re.compile(r"^(/[^/\s]|[A-Za-z]:[\\/]|\\\\|~/)")


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (str(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _absolute_paths(data: Any) -> list[str]:
    return [s for s in _strings(data) if ABSOLUTE.match(s)]


def test_the_format1_fixtures_are_what_thali_0_1_wrote() -> None:
    """The fixtures hold the bundled cards as they shipped: config embedded, machine paths in them."""
    for path in sorted(FORMAT1.glob("*.json")):
        card = json.loads(path.read_text())
        assert "format" not in card and "config" in card and card["lineage"]["run"].startswith("/")


def _format1_store(tmp_path: Path) -> Path:
    """A registry holding plant_disease v2 as it shipped: the bundled model files, the format-1 card."""
    source = BUNDLED / "plant_disease" / "versions" / "2"
    if not source.is_dir():
        pytest.skip("no bundled plant_disease v2 in models/")
    store = tmp_path / "registry"
    target = store / "plant_disease" / "versions" / "2"
    shutil.copytree(source, target)
    shutil.copy(FORMAT1 / "plant_disease_v2_card.json", target / "card.json")
    checksums = json.loads((target / "checksums.json").read_text())
    checksums["files"]["card.json"] = hashlib.sha256((target / "card.json").read_bytes()).hexdigest()
    (target / "checksums.json").write_text(json.dumps(checksums))
    return store


def test_a_package_of_the_format_before_the_manifest_loads_and_serves(tmp_path: Path) -> None:
    from thali.api import Settings, create_app
    from thali.registry import ModelRegistry

    store = _format1_store(tmp_path)
    package = ModelRegistry(store, cache_dir=tmp_path / "cache").resolve("plant_disease", 2)
    manifest = package.manifest
    assert manifest.format == FORMAT and manifest.version == 2
    assert manifest.serving.variant == "int8" and manifest.serving.top_k == 5  # from its embedded config
    assert manifest.lineage.run_id == "run" and manifest.lineage.checkpoint_sha256
    assert manifest.description and manifest.licence != "not stated"
    assert [c.name for c in manifest.classes] == package.class_names
    assert not _absolute_paths(package.card)

    settings = Settings(registry=str(store), cache_entries=0)
    app = create_app(settings)
    try:
        client = app.test_client()
        leaf = jpeg("green", (224, 224))
        answer = client.post("/v1/domains/plant_disease/predict", data={"image": (io.BytesIO(leaf), "l.jpg")})
        assert answer.status_code == 200, answer.get_json()
        assert answer.get_json()["variant"] == "fp32"  # int8 was gated out: the fallback, as before
        card = client.get("/v1/domains/plant_disease/card").get_json()
        assert card["card"]["format"] == FORMAT and "config" not in card["card"]
        assert not _absolute_paths(card)
    finally:
        app.extensions["thali"].hosting.close()


def test_the_bundled_cards_and_a_fresh_export_hold_no_absolute_path(
    tiny_export: Path, tmp_path: Path
) -> None:
    from thali.registry import ModelRegistry

    cards = sorted(BUNDLED.glob("*/versions/*/card.json"))
    assert cards, "no bundled models"
    for path in cards:
        data = json.loads(path.read_text())
        assert data.get("format") == FORMAT, f"{path}: not rewritten in the current format"
        assert not _absolute_paths(data), (path, _absolute_paths(data))
    for name in ("card.json", "export.json"):
        data = json.loads((tiny_export / name).read_text())
        assert not _absolute_paths(data), (name, _absolute_paths(data))
    registry = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    registry.publish(tiny_export)
    published = json.loads((tmp_path / "registry" / "tiny" / "versions" / "1" / "card.json").read_text())
    assert not _absolute_paths(published)
    exported = json.loads((tiny_export / "card.json").read_text())
    # publishing numbers the manifest and changes nothing else
    assert published["version"] == 1 and exported["version"] is None
    unchanged = {k: v for k, v in published.items() if k not in ("version", "published_at", "thali_version")}
    assert unchanged == {k: v for k, v in exported.items() if k in unchanged}


def test_export_set_serving_is_what_serve_picks(tiny_run: Path, tiny_export: Path, tmp_path: Path) -> None:
    """``thali export RUN --set serving.variant=fp32`` (and top_k, batch size): the package's manifest
    holds the overridden values, and the server plans with them; the run's config.yaml says int8."""
    from thali.api import Settings, create_app
    from thali.core import build_plugin_manager
    from thali.core.exporting.pipeline import export_run
    from thali.registry import ModelRegistry

    registries = build_plugin_manager().registries
    overrides = [
        "export.variants=[fp32, int8]",
        "export.gate.max_top1_drop=100",  # keep int8 whatever it scores: fp32 is chosen, not a fallback
        "export.gate.max_class_drop=100",
        "serving.variant=fp32",
        "serving.top_k=2",
        "serving.max_batch_size=3",
    ]
    out = tmp_path / "export"
    export_run(tiny_run, registries, out_dir=out, overrides=overrides, progress=False)
    assert (
        "variant: int8" in (tiny_run / "config.yaml").read_text()
        or "variant" not in (tiny_run / "config.yaml").read_text()
    )
    registry = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    registry.publish(out)
    package = registry.resolve("tiny", 1)
    assert set(package.variants) == {"fp32", "int8"}
    assert package.manifest.serving.model_dump() == {
        "backend": "onnxruntime", "variant": "fp32", "top_k": 2, "max_batch_size": 3, "batch_timeout_ms": 5.0,
    }  # fmt: skip
    app = create_app(Settings(registry=str(tmp_path / "registry"), cache_entries=0, warmup=False))
    try:
        served = app.test_client().get("/v1/domains/tiny").get_json()
        assert served["variant"] == "fp32" and served["top_k"] == 2
        model = app.extensions["thali"].hosting.get("tiny")
        assert model.batcher.max_batch_size == 3
    finally:
        app.extensions["thali"].hosting.close()
    # and without the override, the same run serves the config's int8 (when its gate let it through)
    default = ModelRegistry(tmp_path / "default", cache_dir=tmp_path / "cache2")
    default.publish(tiny_export)
    assert default.resolve("tiny", 1).manifest.serving.variant == "int8"


def _v2(**changes: Any) -> dict[str, Any]:
    base = json.loads((BUNDLED / "plant_disease" / "versions" / "2" / "card.json").read_text())
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 3}, r"format 3; this thali reads formats 1 and 2"),
        ({"domain": "../etc"}, r"card.json: domain: .*not a valid domain name"),
        ({"variants": {"fp32": {"file": "../../model.onnx"}}}, r"card.json: variants: .*fp32.file must be"),
        ({"variants": {"int8": {"file": "model.int8.onnx"}}}, r"card.json: variants: .*no fp32 variant"),
        ({"serving": {"top_k": 0}}, r"card.json: serving.top_k: "),
        ({"preprocess": {"input_size": [3, 224]}}, r"card.json: preprocess.input_size: "),
    ],
)
def test_a_hostile_manifest_is_one_line_naming_the_field(changes: dict[str, Any], message: str) -> None:
    if not (BUNDLED / "plant_disease").is_dir():
        pytest.skip("no bundled plant_disease")
    with pytest.raises(IntegrityError, match=message) as caught:
        read_manifest(_v2(**changes), "plant_disease v2")
    assert "\n" not in caught.value.message and caught.value.message.startswith("plant_disease v2: ")


def test_the_card_endpoint_is_documented_field_by_field() -> None:
    """The OpenAPI spec's ``Manifest`` is generated from the pydantic model: every field is there."""
    from thali.api import Settings, create_app

    app = create_app(Settings(registry="/nonexistent-registry-for-spec", cache_entries=0))
    spec = app.test_client().get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["Manifest"]["properties"]) == set(Manifest.model_fields)
    assert set(schemas["VariantCard"]["properties"]) >= {"file", "top1", "per_class", "gate"}
    card = schemas["Card"]["properties"]["card"]
    assert card["allOf"] == [{"$ref": "#/components/schemas/Manifest"}]
    assert '"type": "null"' not in json.dumps(schemas)  # OpenAPI 3.0: nullable, not a null type
    assert '"const"' not in json.dumps(schemas)
