"""ONNX exporters: ``onnx`` (dynamo export, opset >= 18, dynamic batch, checked against torch) and
``ort_optimize`` (ONNX Runtime graph optimisation at the extended level, saved offline as the fp32
artifact, with node counts before and after).

A thali classifier's export has a second output, ``features`` (N, C): the pooled penultimate features
the unknown score reads (:mod:`thali.core.inference.unknown`); then ``stage_features`` (N, S), the
pooled outputs of the stages ``export.unknown.stages`` names (by default the two before the last).
With ``export.explain`` it also gets ``cam``: class-activation maps ``(N, K, h, w)``
(:class:`thali.core.training.onnx.ServingOutputs`), checked against torch like the logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import ThaliError
from thali.core.export import ExportContext
from thali.core.registry import Registry

INPUT, OUTPUT, FEATURES, STAGE_FEATURES, CAM = "input", "logits", "features", "stage_features", "cam"


def _session(path: Path, **options: Any) -> Any:
    """A CPU session; ONNX Runtime's own log (C++, straight to stderr) is kept to errors."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def torch_cam(context: ExportContext) -> Any:
    """The torch model's class-activation maps on ``example`` (numpy)."""
    import torch

    from thali.core.training.onnx import WithCam

    with torch.no_grad():
        return WithCam(context.model).eval()(context.example)[1].numpy()


def parity(path: Path, context: ExportContext) -> dict[str, float]:
    """Max absolute logit difference and top-1 agreement of ``path`` against torch; for a model with a
    ``cam`` output also ``cam_max_abs_diff`` and ``cam_abs_max`` (the torch maps' scale)."""
    import numpy as np

    reference = context.torch_logits()
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {INPUT: context.example.numpy()})
    got = outputs[0]
    report = {
        "max_abs_logit_diff": float(np.abs(got - reference).max()),
        "top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
    }
    if CAM in names:
        cam, expected = outputs[names.index(CAM)], torch_cam(context)
        if cam.shape != expected.shape:
            raise ThaliError(f"{path.name}: cam output has shape {cam.shape}, torch gives {expected.shape}")
        report["cam_max_abs_diff"] = float(np.abs(cam - expected).max())
        report["cam_abs_max"] = float(np.abs(expected).max())
    return report


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class OnnxExport:
    produces = None

    def __init__(self, tolerance: float = 1e-3) -> None:
        self.tolerance = tolerance

    def run(self, context: ExportContext) -> dict[str, Any]:
        from thali.core.training.onnx import ServingOutputs, export_onnx

        path = context.out_dir / "model.raw.onnx"
        context.model.eval()
        explain = context.settings.explain
        features = all(hasattr(context.model, m) for m in ("backbone", "attention", "dropout", "fc"))
        stages = (
            context.settings.unknown.stage_indices(len(context.model.backbone.stages)) if features else []
        )
        if features or explain:
            module = ServingOutputs(context.model, cam=explain, stages=stages)
        else:
            module = context.model
        outputs = [
            OUTPUT,
            *([FEATURES] if features else []),
            *([STAGE_FEATURES] if stages else []),
            *([CAM] if explain else []),
        ]
        export_onnx(module, context.example, path, output_names=outputs, opset=context.opset)
        report: dict[str, Any] = {
            "path": str(path),
            "opset": context.opset,
            "nodes": node_count(path),
            "outputs": outputs,
        }
        if stages:
            report["stage_features"] = [list(w) for w in module.stage_widths]
        measured = parity(path, context)
        report.update(measured)
        if measured["max_abs_logit_diff"] > self.tolerance or measured["top1_agreement"] < 1.0:
            raise ThaliError(
                f"ONNX export differs from torch: max logit difference {measured['max_abs_logit_diff']:.2e}, "
                f"top-1 agreement {measured['top1_agreement']:.3f}"
            )
        if explain:
            if "cam_max_abs_diff" not in measured:
                raise ThaliError(f"{path.name}: export.explain is set but the model has no {CAM!r} output")
            allowed = self.tolerance * max(1.0, measured["cam_abs_max"])
            if measured["cam_max_abs_diff"] > allowed:
                raise ThaliError(
                    f"ONNX export differs from torch: max cam difference {measured['cam_max_abs_diff']:.2e} "
                    f"(allowed {allowed:.2e})"
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
