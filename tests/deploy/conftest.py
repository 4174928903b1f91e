"""One serving environment per session, built the way the Dockerfile builds the image's."""

from __future__ import annotations

from pathlib import Path

import pytest
from dockerfile_support import build_like_the_dockerfile


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("dockerfile", reason="the `dockerfile` parser is in the dev extra")
    return build_like_the_dockerfile(tmp_path_factory.mktemp("image"))
