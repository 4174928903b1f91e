"""ONNX export of a torch module with the dynamo exporter: opset 18, dynamic batch axis, named I/O.

Also :class:`ServingOutputs`, the module every export writes: the classifier's logits, its
penultimate ``features`` (what the unknown score reads, :mod:`thali.core.inference.unknown`) and, with
``export.explain``, its class-activation maps (Zhou et al., 2016; :class:`WithCam`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from thali.core.export import INPUT
from thali.core.quiet import quiet

if TYPE_CHECKING:  # annotations only
    from .model import Classifier


class WithCam(nn.Module):
    """``x -> (logits, cam)`` for a :class:`~thali.core.training.model.Classifier`.

    ``cam[n, k] = sum_c features[n, c] * fc.weight[k, c]`` over the attended last feature map, so in eval
    mode ``logits[:, k] == cam[:, k].mean((h, w)) + fc.bias[k]``. It holds the classifier's modules
    under their own names, so the export's module paths (``backbone.stem``, for
    ``export.exclude_nodes``) are those of the classifier."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.backbone, self.attention = classifier.backbone, classifier.attention
        self.dropout, self.fc = classifier.dropout, classifier.fc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.attention(self.backbone(x))
        logits = self.fc(self.dropout(features.mean(dim=(2, 3))))
        cam = torch.einsum("nchw,kc->nkhw", features, self.fc.weight)
        return logits, cam


class ServingOutputs(nn.Module):
    """``x -> (logits, features)``, then ``stage_features`` with ``stages``, then ``cam`` with
    ``cam=True``, for a :class:`~thali.core.training.model.Classifier`; ``features`` (N, C) is the
    attended last feature map, average-pooled: the input of the classifier's linear layer;
    ``stage_features`` (N, S) the outputs of the backbone stages ``stages`` (indices), each
    average-pooled, concatenated in that order (what the unknown score's layers read). Module paths
    are the classifier's."""

    def __init__(self, classifier: Classifier, cam: bool = False, stages: Sequence[int] = ()) -> None:
        super().__init__()
        self.backbone, self.attention = classifier.backbone, classifier.attention
        self.dropout, self.fc = classifier.dropout, classifier.fc
        self.cam = cam
        self.stages = tuple(sorted(set(int(i) for i in stages)))
        if any(not 0 <= i < len(self.backbone.stages) for i in self.stages):
            n = len(self.backbone.stages)
            raise ValueError(f"stages {list(self.stages)}; the checkpoint's backbone has {n}")

    @property
    def stage_widths(self) -> list[tuple[int, int]]:
        """``(stage, channels)`` of each group of ``stage_features``, in order."""
        return [(i, int(self.backbone.stage_channels[i])) for i in self.stages]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, tapped = self.backbone.forward_tapped(x, self.stages)
        pooled = [t.mean(dim=(2, 3)) for t in tapped]
        maps = self.attention(x)
        features = maps.mean(dim=(2, 3))
        logits = self.fc(self.dropout(features))
        out: tuple[torch.Tensor, ...] = (logits, features)
        if pooled:
            out += (torch.cat(pooled, dim=1),)
        if self.cam:
            out += (torch.einsum("nchw,kc->nkhw", maps, self.fc.weight),)
        return out


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str = INPUT,
    output_name: str = "output",
    output_names: Sequence[str] | None = None,
    opset: int = 18,
    max_batch: int = 4096,
) -> Path:
    """Export ``module`` (in eval mode) to ``path``; the exporter's chatty output (its prints, the
    onnxscript optimiser's INFO log, warnings) is hidden: see :func:`thali.core.quiet.quiet`.

    ``output_names`` names a module with several outputs (in order); otherwise its one output is
    ``output_name``."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with quiet("ONNX export"):
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=list(output_names) if output_names else [output_name],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        assert program is not None  # only the legacy exporter (dynamo=False) returns None
        program.save(str(path))
    return Path(path)
