"""Registry stores for the tests: a local folder, fsspec's memory store, and moto's S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_fixtures import store_url

from thali.registry import ModelRegistry

DOMAIN = "tiny"


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    s3 = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    url, options = store_url(request.param, tmp_path, s3)
    return ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
