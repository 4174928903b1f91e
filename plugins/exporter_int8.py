"""int8 exporters: ``int8`` (static QDQ, per-channel weights, calibrated on training images) and
``int8_dynamic`` (offered for completeness, with a warning: slow and inaccurate for CNNs).

Static quantisation runs ``quant_pre_process`` on the raw export first (shape inference and basic graph
clean-up, as ONNX Runtime recommends), calibrates activations with MinMax (default), Entropy or
Percentile, and chooses ``reduce_range`` from the CPU: without VNNI, u8 x s8 products are summed in
16 bits and saturate, so weights are kept to 7 bits (measured on Lite0: full range loses 8.5 points of
top-1, 7-bit weights 1.4). Nodes can be kept in float with ``export.exclude_nodes``: a pattern matches
a node name (``node_Conv_12``, shell wildcards allowed) or a module path of the torch model
(``backbone.stem``, ``backbone.stages.0``, ``attention``), read from the exporter's name scopes.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import ConfigError, ThaliError
from thali.core.export import ExportContext, variant_file
from thali.core.quiet import quiet
from thali.core.registry import Registry

from .exporter_onnx import INPUT, parity

log = logging.getLogger("thali.export")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"}
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """True when the x86 CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX); ``cpuinfo``: /proc/cpuinfo text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return bool(VNNI_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def choose_reduce_range(setting: str | bool = "auto", cpuinfo: str | None = None) -> bool:
    """``auto``: 7-bit weights on x86 CPUs without VNNI, full 8 bits elsewhere."""
    if isinstance(setting, bool):
        return setting
    machine = platform.machine().lower()
    if cpuinfo is None and machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return not cpu_has_vnni(cpuinfo)


def _scopes(node: Any) -> list[str]:
    """The torch module paths a node came from (its name scopes without the last, the op itself)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                return [s for s in ast.literal_eval(prop.value)[:-1] if isinstance(s, str) and s]
            except (ValueError, SyntaxError):
                return []
    return []


def select_nodes(model: Any, patterns: Iterable[str]) -> list[str]:
    """Names of the nodes that match any pattern (node name glob, or module path and everything in it).

    A pattern that matches nothing is a :class:`ConfigError` naming ``export.exclude_nodes`` and the
    module paths that exist, so a typo never silently quantises what it meant to keep.
    """
    chosen: list[str] = []
    for pattern in patterns:
        hits = []
        for node in model.graph.node:
            scopes = _scopes(node)
            if fnmatch.fnmatchcase(node.name, pattern) or any(
                s == pattern or s.startswith(pattern + ".") or fnmatch.fnmatchcase(s, pattern) for s in scopes
            ):
                hits.append(node.name)
        if not hits:
            tops = sorted({".".join(s.split(".")[:3]) for n in model.graph.node for s in _scopes(n)})
            raise ConfigError(
                f"export.exclude_nodes: {pattern!r} matches no node; module paths in this model: "
                + ", ".join(tops[:30])
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the context's calibration batches."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches
        self.images = 0

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {INPUT: batch}


def _preprocessed(context: ExportContext) -> Path:
    """The raw export after ``quant_pre_process`` (made once per export, shared by int8 variants)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if "quant_pre" in context.artifacts:
        return context.artifacts["quant_pre"]
    source = context.require("fp32_raw", by="int8 export")
    path = context.out_dir / "model.quant_pre.onnx"
    try:
        with quiet("quant_pre_process"):
            quant_pre_process(str(source), str(path))
    except Exception as exc:  # ORT's symbolic shape inference gives up on some graphs: use ONNX's
        log.info("symbolic shape inference failed (%s); using ONNX shape inference", exc)
        with quiet("quant_pre_process"):
            quant_pre_process(str(source), str(path), skip_symbolic_shape=True)
    context.artifacts["quant_pre"] = path
    return path


class StaticInt8:
    produces = "int8"

    def run(self, context: ExportContext) -> dict[str, Any]:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if context.calibration is None:
            raise ThaliError("static int8 needs calibration images (training images of the domain)")
        source = _preprocessed(context)
        method = context.settings.calibration_method
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        reduce_range = choose_reduce_range(context.settings.reduce_range)
        excluded = select_nodes(onnx.load(str(source)), context.settings.exclude_nodes)
        path = context.out_dir / variant_file(self.produces)
        reader = _Reader(iter(context.calibration()))
        with quiet("static int8 quantisation"):  # ORT logs every tensor it leaves alone, on the root logger
            quantize_static(
                str(source),
                str(path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=excluded,
            )
        if reader.images == 0:
            raise ThaliError("static int8: the calibration set is empty")
        context.artifacts[self.produces] = path
        report = {
            "path": str(path),
            "format": "QDQ",
            "per_channel": True,
            "reduce_range": reduce_range,
            "vnni": cpu_has_vnni(),
            "calibration_method": method,
            "calibration_images": reader.images,
            "excluded_nodes": len(excluded),
        }
        report.update(parity(path, context))
        return report


class DynamicInt8:
    produces = "int8_dynamic"
    WARNING = (
        "int8_dynamic: dynamic quantisation is slow and inaccurate for CNNs (convolutions become "
        "ConvInteger with activations quantised at run time); prefer the static int8 variant"
    )

    def run(self, context: ExportContext) -> dict[str, Any]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        print(f"warning: {self.WARNING}")
        context.warnings.append(self.WARNING)
        source = _preprocessed(context)
        path = context.out_dir / variant_file(self.produces)
        with quiet("dynamic int8 quantisation"):
            quantize_dynamic(str(source), str(path), weight_type=QuantType.QUInt8, per_channel=False)
        context.artifacts[self.produces] = path
        report: dict[str, Any] = {"path": str(path), "warning": self.WARNING}
        report.update(parity(path, context))
        return report


@hookimpl
def thali_register_exporters(registry: Registry[Any]) -> None:
    registry.add(
        "int8",
        StaticInt8,
        description="static QDQ int8, per-channel, calibrated on training images, reduce_range by CPU",
    )
    registry.add(
        "int8_dynamic", DynamicInt8, description="dynamic int8 (slow and inaccurate for CNNs; warns)"
    )
