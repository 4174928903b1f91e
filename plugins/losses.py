"""Training losses: cross-entropy with label smoothing, focal loss, class-balanced cross-entropy.

All accept class-index targets or soft ``(N, num_classes)`` targets (mixup/cutmix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thali.core import hookimpl
from thali.core.errors import ConfigError
from thali.core.registry import Registry


def _soft(target: Any, num_classes: int, smoothing: float) -> Any:
    import torch.nn.functional as F

    if target.dim() == 1:
        target = F.one_hot(target, num_classes).float()
    return target * (1.0 - smoothing) + smoothing / num_classes


def _weighted_ce(num_classes: int, smoothing: float, weight: Any = None, gamma: float = 0.0) -> Any:
    import torch
    import torch.nn.functional as F

    class WeightedCrossEntropy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", weight if weight is not None else torch.ones(num_classes))

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            soft = _soft(target, num_classes, smoothing)
            logp = F.log_softmax(logits.float(), dim=-1)
            per_class = -soft * logp
            if gamma > 0:  # focal modulation (Lin et al., 2017)
                per_class = per_class * (1.0 - logp.exp()).pow(gamma)
            return (per_class * self.weight).sum(-1).mean()

    return WeightedCrossEntropy()


def cross_entropy(
    num_classes: int, class_counts: Sequence[int] | None = None, label_smoothing: float = 0.0
) -> Any:
    """Cross-entropy with label smoothing."""
    return _weighted_ce(num_classes, label_smoothing)


def focal(
    num_classes: int,
    class_counts: Sequence[int] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
) -> Any:
    """Focal loss: down-weights easy examples by ``(1 - p)^gamma``."""
    if gamma < 0:
        raise ConfigError(f"loss.params.gamma: must be >= 0, got {gamma}")
    return _weighted_ce(num_classes, label_smoothing, gamma=gamma)


def class_balanced(
    num_classes: int,
    class_counts: Sequence[int] | None = None,
    label_smoothing: float = 0.0,
    beta: float = 0.999,
    gamma: float = 0.0,
) -> Any:
    """Class-balanced cross-entropy (Cui et al., 2019): weights by the effective number of samples."""
    import torch

    if not class_counts or len(class_counts) != num_classes:
        raise ConfigError("loss: class_balanced needs the training images per class (class_counts)")
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"loss.params.beta: must be in [0, 1), got {beta}")
    counts = torch.tensor([max(1, int(c)) for c in class_counts], dtype=torch.float32)
    effective = (1.0 - torch.pow(beta, counts)) / (1.0 - beta)
    weight = 1.0 / effective
    weight = weight / weight.sum() * num_classes
    return _weighted_ce(num_classes, label_smoothing, weight=weight, gamma=gamma)


@hookimpl
def thali_register_losses(registry: Registry[Any]) -> None:
    registry.add("cross_entropy", cross_entropy, description="cross-entropy with label smoothing")
    registry.add("focal", focal, description="focal loss (params: gamma)")
    registry.add(
        "class_balanced",
        class_balanced,
        description="class-balanced cross-entropy by effective number of samples (params: beta, gamma)",
    )
