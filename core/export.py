"""The exporter contract: what exporter plugins share while turning a trained model into variants.

Exporters run in order (``onnx`` first); each reads what earlier ones left in ``artifacts`` and writes
one variant, then adds a report (parity, node counts, sizes) to ``reports``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExportContext:
    """Shared state of one export.

    ``model``: the trained classifier (torch, eval mode). ``example``: a float32 ``(N, 3, H, W)`` batch
    of real, preprocessed images used for tracing and for parity checks. ``artifacts`` maps variant
    names (``fp32_raw``, ``fp32``, ``int8``, ``fp16``) to files in ``out_dir``.
    """

    model: Any
    example: Any
    out_dir: Path
    opset: int = 18
    artifacts: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
