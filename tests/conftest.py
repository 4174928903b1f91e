"""Shared fixtures. Tests that need the real datasets skip with a reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from api_support import api_registry, explain_export, second_export, server  # noqa: F401 (fixtures)
from helpers import find_datasets, use_site, write_demo_distribution
from registry_fixtures import s3_endpoint  # noqa: F401 (fixture)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# Fixtures that train or export a model first (or serve the exported ones): in a fresh session a test
# that needs one takes more than a few seconds before it starts, so it is marked slow here, and
# `make test-fast` (pytest -m "not slow") never trains. A new test that uses one is slow too; a test
# slow on its own (a training run of its own, a server process) carries @pytest.mark.slow.
SLOW_FIXTURES = frozenset(
    {"tiny_run", "tiny_export", "explain_export", "second_export", "api_registry", "server"}
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = find_datasets()
    if root is None:
        pytest.skip("real datasets not found: set $THALI_DATA or put shared/datasets beside the repo")
    return root


@pytest.fixture
def demo_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A third-party plugin distribution on sys.path (and PYTHONPATH for subprocesses)."""
    return use_site(write_demo_distribution(tmp_path / "site"), monkeypatch)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder (3 colour classes, 10 images each, one broken file)."""
    from helpers import write_tiny_imagefolder

    return write_tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "images")


@pytest.fixture(scope="session")
def registries() -> object:
    from thali.core import build_plugin_manager

    return build_plugin_manager(autoload=False).registries


# A tiny model that really learns the three colours (top-1 1.0), so exports and gates have something
# to lose; wider than the tiny default so int8 has weights to shrink.
TRAINED_TINY = [
    "model.params={width: 16, num_stages: 3, input_size: 32}",
    "training.epochs=6",
    "augmentation.mix_prob=0",
    "optimizer.lr=0.01",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, registries: object) -> Path:
    """A finished training run of the tiny domain (best.pt, split.json, config.yaml, ...)."""
    from helpers import write_tiny_domain

    from thali.core import load_config
    from thali.core.training.trainer import TrainOptions, train

    root = tmp_path_factory.mktemp("tiny_run")
    config = load_config(write_tiny_domain(root / "cfg"), TRAINED_TINY)
    train(config, registries, TrainOptions(run_dir=root / "run", data=str(tiny_data), progress=False))
    return root / "run"


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, registries: object) -> Path:
    """``thali export`` of the tiny run (fp32 + int8), made once per session. Its unknown score also
    reads stages 0 and 1 (``stage_features``; what ``auto`` picks for a backbone of 4+ stages), so every
    serving test runs that path too."""
    from thali.core.exporting.pipeline import export_run

    out = tiny_run.parent / "export_for_registry"
    overrides = ["export.variants=[fp32, int8]", "export.unknown.stages=[0, 1]"]
    export_run(tiny_run, registries, out_dir=out, overrides=overrides, progress=False)
    return out
