"""A real ``thali serve`` (gunicorn) process on 127.0.0.1 over a registry with two tiny domains (one with
a heatmap output, two versions) and one damaged package, shared by the API tests of a session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import Server, start_server, stop_server
from helpers import write_tiny_domain


@pytest.fixture(scope="session")
def explain_export(tiny_run: Path, registries: Any) -> Path:
    """The tiny run exported with the heatmap output (fp32 + int8)."""
    from thali.core.exporting.pipeline import export_run

    out = tiny_run.parent / "export_explain"
    export_run(
        tiny_run,
        registries,
        out_dir=out,
        overrides=["export.variants=[fp32, int8]", "export.explain=true"],
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def second_export(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, registries: Any) -> Path:
    """A second domain, trained here: two of the colours, its own name."""
    from thali.core import load_config
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.trainer import TrainOptions, train

    root = tmp_path_factory.mktemp("second_domain")
    data = root / "data"
    for colour in ("blue", "red"):
        shutil.copytree(tiny_data / colour, data / colour)
    config_path = write_tiny_domain(root / "cfg")
    text = config_path.read_text().replace("name: tiny", "name: duo")
    text = text.replace(
        "classes: [{name: blue}, {name: green}, {name: red}]", "classes: [{name: blue}, {name: red}]"
    )
    config_path.write_text(text)
    config = load_config(config_path, ["training.epochs=4", "augmentation.mix_prob=0", "optimizer.lr=0.01"])
    train(config, registries, TrainOptions(run_dir=root / "run", data=str(data), progress=False))
    out = root / "export"
    export_run(root / "run", registries, out_dir=out, overrides=["export.variants=[fp32]"], progress=False)
    return out


@pytest.fixture(scope="session")
def api_registry(
    tmp_path_factory: pytest.TempPathFactory, explain_export: Path, second_export: Path, tiny_export: Path
) -> Path:
    """tiny v1 (production, with heatmaps) and v2; duo v1 (latest only); broken v1 (damaged file)."""
    from thali.registry import ModelRegistry

    root = tmp_path_factory.mktemp("api_registry")
    registry = ModelRegistry(root / "registry", cache_dir=root / "cache")
    registry.publish(explain_export, aliases=["production"])
    registry.publish(explain_export)
    registry.publish(second_export)
    broken = root / "broken_export"
    shutil.copytree(tiny_export, broken)
    report = json.loads((broken / "export.json").read_text())
    report["domain"] = "broken"
    (broken / "export.json").write_text(json.dumps(report))
    registry.publish(broken, aliases=["production"])
    model = root / "registry" / "broken" / "versions" / "1" / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # a flipped tail: fails its checksum
    return root / "registry"


@pytest.fixture(scope="session")
def server(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {"THALI_MAX_UPLOAD_BYTES": str(300 * 1024), "THALI_CACHE": str(log.parent / "cache")}
    running = start_server(api_registry, log, env)
    try:
        yield running
    finally:
        stop_server(running)
