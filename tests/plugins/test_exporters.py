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
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]  # features: unknown score
    batch = torch.randn(7, 3, 32, 32)  # another batch size than the export example
    with torch.no_grad():
        expected = context.model(batch).numpy()
    np.testing.assert_allclose(session.run(None, {"input": batch.numpy()})[0], expected, atol=1e-4)


def test_graph_optimisation_needs_an_export_first(context: ExportContext, registries: object) -> None:
    with pytest.raises(ThaliError, match="needs the onnx exporter to run first"):
        registries.exporters.create("ort_optimize").run(context)


# --- the south_asian_food architecture: Lite0 (offline ImageNet weights) + SE head + coord attention ---


def _real_images(preprocess: dict) -> object:
    """Four real photos that ship with scikit-image, preprocessed like evaluation does."""
    import torch
    from skimage import data

    from thali.core.training.transforms import eval_transform

    transform = eval_transform(preprocess)
    photos = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket()]
    batch = [transform(image=np.ascontiguousarray(p[..., :3]))["image"] for p in photos]
    return torch.stack(batch + [b.flip(-1) for b in batch])  # and their mirror images: 8 in all


@pytest.fixture(scope="module")
def lite0_export(tmp_path_factory: pytest.TempPathFactory, registries: object) -> ExportContext:
    from thali.core.config import ExportConfig
    from thali.core.domains import resolve_domain

    config = resolve_domain(registries, "south_asian_food").load_config([])
    assert config.model.backbone == "tf_efficientnet_lite0" and config.model.attention
    model = build_classifier(config, registries).eval()  # offline ImageNet weights, random head
    example = _real_images(model.preprocess)
    context = ExportContext(
        model=model,
        example=example,
        out_dir=tmp_path_factory.mktemp("lite0"),
        settings=ExportConfig(calibration_images=8),
        calibration=lambda: iter([example.numpy()]),
    )
    for name in ("onnx", "ort_optimize"):
        context.reports[name] = registries.exporters.create(name).run(context)
    return context


@pytest.mark.slow
def test_south_asian_food_architecture_exports_with_parity(lite0_export: ExportContext) -> None:
    exported, optimised = lite0_export.reports["onnx"], lite0_export.reports["ort_optimize"]
    assert exported["max_abs_logit_diff"] < 1e-3 and exported["top1_agreement"] == 1.0
    assert optimised["max_abs_logit_diff"] < 1e-3 and optimised["top1_agreement"] == 1.0
    assert optimised["nodes_after"] < optimised["nodes_before"]


def test_static_int8_is_at_least_3x_smaller_and_fp16_keeps_float_io(
    lite0_export: ExportContext, registries: object
) -> None:
    import onnxruntime as ort

    from thali.plugins.exporter_int8 import cpu_has_vnni

    report = registries.exporters.create("int8").run(lite0_export)
    int8, fp32 = lite0_export.artifacts["int8"], lite0_export.artifacts["fp32"]
    assert fp32.stat().st_size / int8.stat().st_size >= 3.0
    assert report["format"] == "QDQ" and report["per_channel"] and report["calibration_images"] == 8
    assert report["reduce_range"] == (not cpu_has_vnni())
    ops = {n.op_type for n in __import__("onnx").load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    fp16 = registries.exporters.create("fp16").run(lite0_export)
    session = ort.InferenceSession(str(lite0_export.artifacts["fp16"]), providers=["CPUExecutionProvider"])
    assert (
        session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"
    )
    assert fp16["top1_agreement"] == 1.0 and fp16["max_abs_logit_diff"] < 0.05
    assert lite0_export.artifacts["fp16"].stat().st_size < 0.6 * fp32.stat().st_size


def test_int8_keeps_named_modules_in_float_and_names_a_bad_pattern(
    context: ExportContext, registries
) -> None:
    import onnx

    from thali.core import ConfigError
    from thali.core.config import ExportConfig

    registries.exporters.create("onnx").run(context)
    context.calibration = lambda: iter([context.example.numpy()])
    context.settings = ExportConfig(exclude_nodes=["attention"])
    report = registries.exporters.create("int8").run(context)
    assert report["excluded_nodes"] > 0
    graph = onnx.load(str(context.artifacts["int8"])).graph
    float_ops = {n.op_type for n in graph.node if "attention" in n.name or n.op_type == "Sigmoid"}
    assert "Sigmoid" in float_ops  # the SE gate stayed a float op, not QLinearSigmoid

    context.settings = ExportConfig(exclude_nodes=["atention"])
    with pytest.raises(ConfigError, match=r"export.exclude_nodes: 'atention' matches no node.*attention"):
        registries.exporters.create("int8").run(context)


def test_dynamic_int8_warns(context: ExportContext, registries: object, capsys) -> None:
    registries.exporters.create("onnx").run(context)
    report = registries.exporters.create("int8_dynamic").run(context)
    assert "slow and inaccurate for CNNs" in capsys.readouterr().out
    assert context.warnings and report["warning"] == context.warnings[0]
    assert context.artifacts["int8_dynamic"].name == "model.int8_dynamic.onnx"


def test_reduce_range_follows_vnni() -> None:
    from thali.plugins.exporter_int8 import choose_reduce_range, cpu_has_vnni

    zen3 = "processor : 0\nflags : fpu sse sse2 avx avx2 fma\n"
    sapphire = "processor : 0\nflags : fpu avx2 avx512f avx512_vnni amx_int8\n"
    assert not cpu_has_vnni(zen3) and cpu_has_vnni(sapphire)
    assert choose_reduce_range("auto", zen3) is True
    assert choose_reduce_range("auto", sapphire) is False
    assert choose_reduce_range(False, zen3) is False
