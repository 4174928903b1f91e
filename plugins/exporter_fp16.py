"""``fp16`` exporter: weights and activations in float16, inputs and outputs kept in float32.

Converted from the raw export (the graph-optimised fp32 model may hold CPU-only fused operators).
Half the file size; fast on GPUs. On a CPU without fp16 kernels ONNX Runtime inserts casts around the
operators and the variant is slower than fp32: ``thali bench`` shows it.
"""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.export import ExportContext, variant_file
from thali.core.quiet import quiet
from thali.core.registry import Registry

from .exporter_onnx import parity


class Float16:
    produces = "fp16"

    def run(self, context: ExportContext) -> dict[str, Any]:
        import onnx

        source = context.require("fp32_raw", by="fp16 export")
        with quiet("fp16 conversion"):
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        path = context.out_dir / variant_file(self.produces)
        onnx.save(model, str(path))
        context.artifacts[self.produces] = path
        report = {"path": str(path), "keep_io_types": True}
        report.update(parity(path, context))
        return report


@hookimpl
def thali_register_exporters(registry: Registry[Any]) -> None:
    registry.add("fp16", Float16, description="float16 weights and activations, float32 inputs/outputs")
