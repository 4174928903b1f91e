"""ONNX exporters: ``onnx`` (dynamo export, opset >= 18, dynamic batch, checked against torch) and
``ort_optimize`` (ONNX Runtime graph optimisation at the extended level, saved offline as the fp32
artifact, with node counts before and after)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import ThaliError
from thali.core.export import ExportContext
from thali.core.registry import Registry

INPUT, OUTPUT = "input", "logits"


def _session(path: Path, **options: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity(path: Path, context: ExportContext) -> dict[str, float]:
    """Max absolute logit difference and top-1 agreement of ``path`` against torch."""
    import numpy as np

    reference = context.torch_logits()
    got = _session(path).run(None, {INPUT: context.example.numpy()})[0]
    return {
        "max_abs_logit_diff": float(np.abs(got - reference).max()),
        "top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
    }


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class OnnxExport:
    produces = None

    def __init__(self, tolerance: float = 1e-3) -> None:
        self.tolerance = tolerance

    def run(self, context: ExportContext) -> dict[str, Any]:
        from thali.core.training.onnx import export_onnx

        path = context.out_dir / "model.raw.onnx"
        context.model.eval()
        export_onnx(context.model, context.example, path, output_name=OUTPUT, opset=context.opset)
        report = {"path": str(path), "opset": context.opset, "nodes": node_count(path)}
        report.update(parity(path, context))
        if report["max_abs_logit_diff"] > self.tolerance or report["top1_agreement"] < 1.0:
            raise ThaliError(
                f"ONNX export differs from torch: max logit difference {report['max_abs_logit_diff']:.2e}, "
                f"top-1 agreement {report['top1_agreement']:.3f}"
            )
        context.artifacts["fp32_raw"] = path
        return report


class OrtOptimize:
    produces = None

    def run(self, context: ExportContext) -> dict[str, Any]:
        import onnxruntime as ort

        source = context.require("fp32_raw", by="ort_optimize")
        path = context.out_dir / "model.onnx"
        _session(
            source,
            graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            optimized_model_filepath=str(path),
        )
        report = {"path": str(path), "nodes_before": node_count(source), "nodes_after": node_count(path)}
        report.update(parity(path, context))
        context.artifacts["fp32"] = path
        return report


@hookimpl
def thali_register_exporters(registry: Registry[Any]) -> None:
    registry.add("onnx", OnnxExport, description="dynamo ONNX export, dynamic batch, parity vs torch")
    registry.add(
        "ort_optimize",
        OrtOptimize,
        description="ONNX Runtime graph optimisation (extended), saved as the fp32 artifact",
    )
