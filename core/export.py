"""The exporter contract: what exporter plugins share while turning a trained model into variants.

Exporters are registered by name (``thali_register_exporters``) and run in order: ``onnx`` writes the
raw export, ``ort_optimize`` the graph-optimised fp32 model, then one exporter per variant named in
``export.variants`` (``int8``, ``fp16``, ``int8_dynamic`` or a plugin's own). Each exporter reads what
earlier ones left in ``artifacts``, writes its file into ``out_dir`` and returns a report (parity, node
counts, sizes, settings). A *variant* exporter sets ``produces`` to the variant name and stores its
file as ``artifacts[produces]``; the export engine then gates it on the validation split and only
copies it into the export folder when it passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import ExportConfig
from .errors import ThaliError

#: File name of each built-in variant inside an export (and a model package).
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
    "int8_dynamic": "model.int8_dynamic.onnx",
}


def variant_file(variant: str) -> str:
    """``model.onnx`` for fp32, ``model.<variant>.onnx`` for every other variant (plugins' too)."""
    return VARIANT_FILES.get(variant, f"model.{variant}.onnx")


@dataclass
class ExportContext:
    """Shared state of one export.

    ``model``: the trained classifier (torch, eval mode). ``example``: a float32 ``(N, 3, H, W)`` batch
    of real, preprocessed images used for tracing and for parity checks. ``settings``: the domain's
    ``export`` config section (calibration size and method, excluded nodes, gate; defaults if not
    given). ``calibration``: a callable returning an iterator of preprocessed float32 numpy batches of
    *training* images, for static quantisation. ``out_dir``: where exporters write (a working folder;
    the engine copies what passes into the export). ``artifacts`` maps ``fp32_raw``, ``fp32`` and
    variant names to files; ``warnings`` collects what the user must read (printed by the CLI).
    """

    model: Any
    example: Any
    out_dir: Path
    opset: int = 18
    settings: ExportConfig = field(default_factory=ExportConfig)
    calibration: Callable[[], Iterator[Any]] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _torch_logits: Any = field(default=None, repr=False)

    def require(self, artifact: str, by: str) -> Path:
        """The file an earlier exporter stored as ``artifact``; a clear error if it has not run."""
        if artifact not in self.artifacts:
            step = "onnx" if artifact == "fp32_raw" else artifact
            raise ThaliError(f"{by} needs the {step} exporter to run first")
        return self.artifacts[artifact]

    def torch_logits(self) -> Any:
        """The torch model's logits on ``example`` (numpy), computed once per export for every parity
        check."""
        if self._torch_logits is None:
            import torch

            with torch.no_grad():
                self._torch_logits = self.model(self.example).numpy()
        return self._torch_logits


class Exporter(Protocol):
    """What ``registry.create(name)`` returns for an exporter: ``produces`` is the variant name it
    writes (``None`` for the steps that make the fp32 model) and ``run`` returns its report."""

    produces: str | None

    def run(self, context: ExportContext) -> dict[str, Any]: ...
