"""Training losses: cross-entropy with label smoothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def cross_entropy(
    num_classes: int, class_counts: Sequence[int] | None = None, label_smoothing: float = 0.0
) -> Any:
    """Cross-entropy on class indices or on soft (mixup/cutmix) targets."""
    import torch
    import torch.nn.functional as F

    class CrossEntropy(torch.nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if target.dim() == 2:  # soft targets
                soft = target * (1.0 - label_smoothing) + label_smoothing / num_classes
                return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    return CrossEntropy()


@hookimpl
def thali_register_losses(registry: Registry[Any]) -> None:
    registry.add(
        "cross_entropy",
        cross_entropy,
        description="cross-entropy with label smoothing; accepts soft targets",
    )
