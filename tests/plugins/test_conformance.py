"""Every built-in component passes thali's conformance kit (:mod:`thali.testing`): the same checks
``thali check`` runs on third-party plugins (backbones and attention: shape, backward, ONNX export
parity; losses on index and soft targets; readers on a tiny data set; exporters and serving backends
on a tiny model; domain packs' configs).

The ONNX export of an EfficientNet takes 15-35 s on a 2-core CPU, so by default the backbone ONNX
parity check runs on one backbone of each construction thali ships (``se_cnn``, and
``tf_efficientnet_lite0`` for the timm EfficientNets, which share ``build_timm``); the other timm
backbones get every other check, at 32 px. ``THALI_CONFORMANCE_FULL=1`` exports them all (about 4 minutes), as
``thali check thali.plugins.backbones_timm`` does.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from thali.core import build_plugin_manager
from thali.testing import CheckResult, assert_conformant, check_component

PM = build_plugin_manager(autoload=False)
COMPONENTS = [(kind, entry.name) for kind, registry in PM.registries.items() for entry in registry]
FULL = bool(os.environ.get("THALI_CONFORMANCE_FULL"))
ONNX_BACKBONES = {"se_cnn", "tf_efficientnet_lite0"}

#: Skips that are expected here (a full training install): anything else skipped is a vacuous pass.
EXPECTED_SKIPS = (
    "a family entry",  # timm/*: members are checked by name (backbones:timm/NAME)
    "not run (onnx=False)",
    "not available for a model without a training run",  # the torch backend needs a training run
    "not run: loads a tiny model did not succeed",
)


def _options(kind: str, name: str) -> dict[str, Any]:
    if kind == "backbones" and not FULL and name not in ONNX_BACKBONES:
        return {"onnx": False, "input_size": 32}
    return {}


def _unexpected_skip(result: CheckResult) -> bool:
    return result.status == "skipped" and not result.detail.startswith(EXPECTED_SKIPS)


def test_every_kind_has_components() -> None:
    assert {kind for kind, _ in COMPONENTS} == {kind for kind, _ in PM.registries.items()}


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}:{n}" for k, n in COMPONENTS])
def test_builtin_component_conforms(kind: str, name: str) -> None:
    results = check_component(PM, kind, name, **_options(kind, name))
    assert results
    assert_conformant(results)
    assert not [r for r in results if _unexpected_skip(r)], [r.detail for r in results if _unexpected_skip(r)]
    assert all(r.distribution and r.distribution.startswith("thali ") for r in results)


def test_a_family_member_is_checked_by_name() -> None:
    """``timm/NAME`` reaches the family entry; its preprocessing comes from the module, not metadata."""
    pytest.importorskip("timm")
    results = check_component(PM, "backbones", "timm/resnet18", onnx=False, input_size=32)
    assert_conformant(results)
    by_check = {r.check: r for r in results}
    assert by_check["metadata"].status == "skipped" and by_check["forward"].status == "passed"
    assert by_check["preprocess"].detail.startswith("input_size (3, 224, 224)")
