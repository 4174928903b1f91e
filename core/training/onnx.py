"""ONNX export of a torch module with the dynamo exporter: opset 18, dynamic batch axis, named I/O."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "output",
    opset: int = 18,
    max_batch: int = 4096,
) -> Path:
    """Export ``module`` (in eval mode) to ``path``; the exporter's chatty optimiser output is hidden."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    program.save(str(path))
    return Path(path)
