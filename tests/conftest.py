"""Shared fixtures. Tests that need the real datasets skip with a reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import find_datasets, write_demo_distribution

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = find_datasets()
    if root is None:
        pytest.skip("real datasets not found: set $THALI_DATA or put shared/datasets beside the repo")
    return root


@pytest.fixture
def demo_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A third-party plugin distribution on sys.path (and PYTHONPATH for subprocesses)."""
    site = write_demo_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("THALI_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("THALI_BLOCK_PLUGINS", raising=False)
    return site


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder (3 colour classes, 10 images each, one broken file)."""
    from helpers import write_tiny_imagefolder

    return write_tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "images")


@pytest.fixture(scope="session")
def registries() -> object:
    from thali.core import build_plugin_manager

    return build_plugin_manager(autoload=False).registries
