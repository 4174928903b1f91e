"""The registry watch, one poll at a time (``RegistryWatcher.poll``) on a real registry folder and real
ONNX Runtime models, in-process: an alias that moves is followed, a domain published later is served, a
version pinned by the admin stays, a missing alias or store is reported and the old model kept."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN_KEY, jpeg

from thali.api import Settings, create_app


@pytest.fixture
def watched(tmp_path: Path, tiny_export: Path, explain_export: Path) -> Any:
    from thali.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "publisher")
    registry.publish(tiny_export, aliases=["production"])
    registry.publish(explain_export)
    settings = Settings(
        registry=str(tmp_path / "registry"), watch_s=3600, admin_key=ADMIN_KEY, cache_entries=0
    )
    app = create_app(settings)
    hosting = app.extensions["thali"].hosting
    try:
        yield app, hosting, registry
    finally:
        hosting.close()


def _ready(app: Any) -> dict[str, Any]:
    response = app.test_client().get("/readyz")
    return {**response.get_json(), "http": response.status_code}


def test_a_moved_alias_is_followed_and_a_pinned_version_stays(watched: Any) -> None:
    app, hosting, registry = watched
    assert hosting.models["tiny"].version == 1 and hosting.watcher is not None
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 1  # nothing moved: nothing loaded again
    assert _ready(app)["watch"]["tiny"]["ref"] == "production"

    registry.promote("tiny", 2, "production")
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 2
    answer = app.test_client().post(
        "/v1/domains/tiny/predict", data={"image": (io.BytesIO(jpeg("red")), "red.jpg")}
    )
    assert answer.status_code == 200 and answer.get_json()["version"] == 2
    state = _ready(app)["watch"]["tiny"]
    assert state["swaps"] == 1 and state["refused"] is None and state["error"] is None

    pinned = app.test_client().put("/v1/domains/tiny", json={"ref": "1"}, headers={"X-API-Key": ADMIN_KEY})
    assert pinned.status_code == 200
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 1  # an admin load of a version number is not undone


def test_a_domain_published_later_is_served(watched: Any, second_export: Path) -> None:
    app, hosting, registry = watched
    assert "duo" not in hosting.models
    registry.publish(second_export, aliases=["production"])
    hosting.watcher.poll()
    assert hosting.models["duo"].version == 1 and hosting.models["duo"].ref == "production"
    ready = _ready(app)
    assert ready["http"] == 200 and ready["domains"]["duo"]["ready"] is True

    unloaded = app.test_client().delete("/v1/domains/duo", headers={"X-API-Key": ADMIN_KEY})
    assert unloaded.status_code == 204
    hosting.watcher.poll()
    assert "duo" not in hosting.models  # an admin's unload is not undone by the watch


def test_a_vanished_alias_or_store_keeps_the_old_model_and_says_why(watched: Any, tmp_path: Path) -> None:
    app, hosting, _ = watched
    (tmp_path / "registry" / "tiny" / "aliases" / "production.json").unlink()
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 1
    ready = _ready(app)
    assert ready["http"] == 200  # still ready: v1 is served
    assert "no alias 'production'" in ready["watch"]["tiny"]["error"]

    shutil.rmtree(tmp_path / "registry")  # the whole store gone
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 1
    assert _ready(app)["http"] == 200


def test_a_malformed_alias_record_is_an_error_not_a_swap(watched: Any, tmp_path: Path) -> None:
    app, hosting, _ = watched
    alias = tmp_path / "registry" / "tiny" / "aliases" / "production.json"
    alias.write_text(json.dumps({"version": "../../etc"}))
    hosting.watcher.poll()
    assert hosting.models["tiny"].version == 1
    assert _ready(app)["watch"]["tiny"]["error"]
