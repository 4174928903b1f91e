"""``thali evaluate DOMAIN[@REF]``: a registry model scored through a serving backend and the serving
preprocessing gives what scoring its training run gives; mistakes are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import thali_in_process

from thali.registry import ModelRegistry


@pytest.fixture(scope="module")
def registry(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny export published twice: v1 with the ``production`` alias, v2 as the latest."""
    root = tmp_path_factory.mktemp("evaluate")
    store = ModelRegistry(root / "registry", cache_dir=root / "cache")
    store.publish(tiny_export, aliases=["production"])
    store.publish(tiny_export)
    env = {"THALI_CACHE": str(root / "cli-cache")}
    return {"url": str(root / "registry"), "env": env, "variants": set(store.resolve("tiny", 1).variants)}


def _evaluate(registry: dict[str, Any], *args: str) -> Any:
    return thali_in_process(
        "evaluate", *args, "--registry", registry["url"], "--no-progress", env=registry["env"]
    )


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_registry_model_scores_like_its_training_run(
    registry: dict[str, Any], tiny_run: Path, tiny_data: Path
) -> None:
    ours = _json(_evaluate(registry, "tiny@1", "--data", str(tiny_data), "--json"))
    run = _json(
        thali_in_process("evaluate", str(tiny_run), "--data", str(tiny_data), "--json", "--no-progress")
    )
    assert ours["images"] == run["images"] == 30 and ours["skipped"] == run["skipped"] == 1
    assert abs(ours["top1"] - run["top1"]) <= 1 / run["images"]
    assert "zz_broken.jpg" in ours["problems"] and "zz_broken.jpg" in run["problems"]
    assert set(ours) >= set(run) - {"run"}  # the same metrics
    assert set(ours["per_class"]) == set(run["per_class"]) == {"blue", "green", "red"}
    assert ours["model"] == "tiny@1" and ours["variant"] == "fp32" and ours["backend"] == "onnxruntime"
    assert ours["provider"] == "CPUExecutionProvider" and ours["temperature"] == run["temperature"]

    torch = _json(
        _evaluate(
            registry,
            "tiny@1",
            "--data",
            str(tiny_data),
            "--json",
            "--backend",
            "torch",
            "--run",
            str(tiny_run),
        )
    )
    assert torch["backend"] == "torch" and torch["top1"] == run["top1"]
    assert torch["confusion_matrix"] == run["confusion_matrix"]


def test_int8_of_the_default_version_in_text(registry: dict[str, Any], tiny_data: Path) -> None:
    result = _evaluate(registry, "tiny", "--data", str(tiny_data), "--variant", "int8")
    if "int8" not in registry["variants"]:  # the gate refused it: a one-line error says what there is
        assert result.returncode != 0 and "no 'int8' variant" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny@1 (int8, onnxruntime on ")  # the production alias, not v2
    assert lines[1].startswith("30 images: top-1 ") and "note: skipped 1 unreadable images" in result.stdout


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("nosuch", "no model of domain 'nosuch'"),
        ("tiny@9", "tiny has no version 9"),
        ("tiny@beta", "tiny has no alias 'beta'"),
        ("runs/gone", "no such training run folder"),
    ],
)
def test_unknown_models_are_one_line_errors(
    registry: dict[str, Any], tiny_data: Path, model: str, says: str
) -> None:
    result = _evaluate(registry, model, "--data", str(tiny_data))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_registry_options_are_refused_for_a_training_run(tiny_run: Path, tiny_data: Path) -> None:
    result = thali_in_process("evaluate", str(tiny_run), "--data", str(tiny_data), "--variant", "int8")
    assert result.returncode != 0 and "--variant: for a registry model" in result.stderr
