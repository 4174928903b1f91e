"""``export.explain``: a ``cam`` output (class-activation maps) beside the logits, in every variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thali.core.exporting.pipeline import export_run


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def explained(tiny_run: Path, registries: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("explain") / "export"
    # exclude_nodes names module paths of the classifier: the cam wrapper must keep them
    overrides = [
        "export.explain=true",
        "export.variants=[fp32, int8]",
        "export.exclude_nodes=[backbone.stem]",
    ]
    return export_run(tiny_run, registries, out_dir=out, overrides=overrides, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_run: Path, registries: object) -> Any:
    from thali.core.training.evaluate import load_run

    return load_run(tiny_run, registries)


def _batch(model: Any, n: int = 5) -> np.ndarray:
    _, h, w = model.preprocess["input_size"]
    return np.random.default_rng(0).standard_normal((n, 3, h, w)).astype(np.float32)


def test_fp32_has_logits_then_cam_matching_torch(explained: dict[str, Any], trained: Any) -> None:
    import torch

    from thali.core.training.onnx import WithCam

    out, model = Path(explained["out_dir"]), trained.model
    session = _session(out / "model.onnx")
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == ["logits", "features", "cam"]
    k = len(trained.config.classes)
    assert not isinstance(outputs[2].shape[0], int) and outputs[2].shape[1] == k  # dynamic batch, K maps
    onnx_step = explained["steps"]["onnx"]
    assert onnx_step["outputs"] == ["logits", "features", "cam"]
    assert onnx_step["cam_max_abs_diff"] <= 1e-3 * max(1.0, onnx_step["cam_abs_max"])
    assert json.loads((out / "preprocess.json").read_text())["explain_output"] == "cam"

    batch = _batch(model)
    logits, _, cam = session.run(None, {"input": batch})
    with torch.no_grad():
        ref_logits, ref_cam = WithCam(model).eval()(torch.from_numpy(batch))
        features = model.backbone(torch.from_numpy(batch))
    assert cam.shape == (5, k, *features.shape[2:])  # (N, K, h, w) on the last feature map
    np.testing.assert_allclose(logits, model(torch.from_numpy(batch)).detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(ref_logits.numpy(), logits, atol=1e-3)
    assert np.abs(cam - ref_cam.numpy()).max() <= 1e-3 * max(1.0, float(np.abs(ref_cam.numpy()).max()))
    # the CAM identity (Zhou et al.): logit k = mean over h, w of cam[k] + bias[k]
    bias = model.fc.bias.detach().numpy()
    np.testing.assert_allclose(cam.mean(axis=(2, 3)) + bias, logits, atol=1e-3)
    np.testing.assert_allclose(ref_cam.mean(dim=(2, 3)).numpy() + bias, ref_logits.numpy(), atol=1e-5)


def test_int8_keeps_both_outputs_and_is_gated_on_logits(explained: dict[str, Any], trained: Any) -> None:
    out = Path(explained["out_dir"])
    if "int8" in explained["variants"]:
        entry = explained["variants"]["int8"]
        assert entry["gate"]["passed"] and entry["metrics"]["top1"] >= 0.9
        assert entry["report"]["excluded_nodes"] > 0
        session = _session(out / entry["file"])
        assert [o.name for o in session.get_outputs()] == ["logits", "features", "cam"]
        logits, _, cam = session.run(None, {"input": _batch(trained.model)})
        assert cam.shape[:2] == (5, len(trained.config.classes)) and logits.shape == (5, cam.shape[1])
    else:  # rejected by the accuracy gate, not by a broken exporter
        assert "gate" in explained["rejected"]["int8"], explained["rejected"]["int8"]
    assert "cam_max_abs_diff" in explained["steps"]["ort_optimize"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["variants"]["fp32"]["metrics"]["top1"] >= 0.9  # the gate scored logits, not cam


def test_without_explain_there_are_logits_and_features(tiny_export: Path) -> None:
    names = [o.name for o in _session(tiny_export / "model.onnx").get_outputs()]
    assert names == ["logits", "features", "stage_features"]  # the session export reads stages 0 and 1
    assert json.loads((tiny_export / "preprocess.json").read_text())["explain_output"] is None


def test_fp16_and_graph_optimisation_keep_the_cam_output(tmp_path: Path, registries: object) -> None:
    import torch
    from helpers import write_tiny_domain

    from thali.core import load_config
    from thali.core.config import ExportConfig
    from thali.core.export import ExportContext
    from thali.core.training.model import build_classifier

    torch.manual_seed(0)
    config = load_config(write_tiny_domain(tmp_path / "cfg"), ["model.attention=[{name: se}]"])
    model = build_classifier(config, registries).eval()
    context = ExportContext(
        model=model, example=torch.randn(4, 3, 32, 32), out_dir=tmp_path, settings=ExportConfig(explain=True)
    )
    for name in ("onnx", "ort_optimize", "fp16"):
        report = registries.exporters.create(name).run(context)
        assert "cam_max_abs_diff" in report, name
    for artifact in ("fp32", "fp16"):
        outputs = _session(context.artifacts[artifact]).get_outputs()
        assert [o.name for o in outputs] == ["logits", "features", "cam"], artifact
    assert report["cam_max_abs_diff"] <= 0.05 * max(1.0, report["cam_abs_max"])  # fp16: looser
