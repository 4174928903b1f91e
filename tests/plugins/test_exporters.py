"""The ONNX exporters on a small SE CNN with attention: parity with torch, dynamic batch, node counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_domain

from thali.core import ThaliError, load_config
from thali.core.export import ExportContext
from thali.core.training.model import build_classifier


@pytest.fixture
def context(tmp_path: Path, registries: object) -> ExportContext:
    import torch

    torch.manual_seed(0)
    config = load_config(write_tiny_domain(tmp_path / "cfg"), ["model.attention=[{name: se}, {name: cbam}]"])
    model = build_classifier(config, registries).eval()
    return ExportContext(model=model, example=torch.randn(4, 3, 32, 32), out_dir=tmp_path)


def test_onnx_then_graph_optimisation(context: ExportContext, registries: object) -> None:
    import onnxruntime as ort
    import torch

    exported = registries.exporters.create("onnx").run(context)
    assert exported["opset"] >= 18 and exported["top1_agreement"] == 1.0
    assert exported["max_abs_logit_diff"] < 1e-4

    optimised = registries.exporters.create("ort_optimize").run(context)
    assert context.artifacts["fp32"].name == "model.onnx" and context.artifacts["fp32"].is_file()
    assert 0 < optimised["nodes_after"] <= optimised["nodes_before"]
    assert optimised["max_abs_logit_diff"] < 1e-4 and optimised["top1_agreement"] == 1.0

    session = ort.InferenceSession(str(context.artifacts["fp32"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    batch = torch.randn(7, 3, 32, 32)  # another batch size than the export example
    with torch.no_grad():
        expected = context.model(batch).numpy()
    np.testing.assert_allclose(session.run(None, {"input": batch.numpy()})[0], expected, atol=1e-4)


def test_graph_optimisation_needs_an_export_first(context: ExportContext, registries: object) -> None:
    with pytest.raises(ThaliError, match="needs the onnx exporter to run first"):
        registries.exporters.create("ort_optimize").run(context)
