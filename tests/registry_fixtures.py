"""Store URLs for registry tests (imported by tests/registry/conftest.py and the tests)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any


def store_url(kind: str, tmp_path: Path, s3: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if kind == "local":
        return str(tmp_path / "registry"), {}
    if kind == "memory":
        return f"memory://thali-{uuid.uuid4().hex}", {}
    assert s3 is not None
    return f"s3://models/{uuid.uuid4().hex}", {"endpoint_url": s3["endpoint_url"]}
