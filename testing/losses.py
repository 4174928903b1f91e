"""Checks of training losses (``thali_register_losses``).

The factory is called as thali's trainer calls it: ``factory(num_classes, class_counts=[...],
**params)``, with ``label_smoothing=0.0`` when it accepts that argument. The loss it returns may be any
callable, an ``nn.Module`` or a plain function; on class-index targets and on soft ``(N, num_classes)``
probability targets it must return a finite scalar tensor that backpropagates to the logits. Both
matter: thali's training loop hands the loss a ``(N, num_classes)`` float matrix on every batch
(one-hot rows when the batch is not mixed), the hookspec promises class indices too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from thali.core.registry import Entry, accepts

from .checks import TORCH, Check, CheckFailed, params_of, shape

LOSS_OPTIONS = frozenset({"num_classes", "class_counts", "params"})
BATCH = 6


def loss_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    num_classes = int(options.get("num_classes", 5))
    counts = list(options.get("class_counts") or [3 + 4 * i for i in range(num_classes)])
    params = params_of(options)

    def build() -> Any:
        kwargs = {"class_counts": counts, **params}
        if accepts(entry.factory, "label_smoothing"):
            kwargs.setdefault("label_smoothing", 0.0)
        loss = entry.factory(num_classes, **kwargs)
        if not callable(loss):
            raise CheckFailed(f"the factory returned {type(loss).__name__}, which is not callable")
        return loss

    def builds() -> str:
        from torch import nn

        loss = build()
        what = "an nn.Module" if isinstance(loss, nn.Module) else "a plain callable (not an nn.Module)"
        return f"{type(loss).__name__}: {what}, built with {num_classes} classes and class_counts {counts}"

    def on_targets(soft: bool) -> str:
        import torch

        loss = build()
        logits = torch.randn(BATCH, num_classes, requires_grad=True)
        if soft:
            target = torch.softmax(2.0 * torch.randn(BATCH, num_classes), dim=-1)
        else:
            target = torch.arange(BATCH) % num_classes
        value = loss(logits, target)
        if not isinstance(value, torch.Tensor):
            raise CheckFailed(f"returned {type(value).__name__}, not a tensor")
        if value.numel() != 1:
            raise CheckFailed(
                f"returned shape {shape(value)} from {shape(logits)} logits; a loss is a scalar"
            )
        if not torch.isfinite(value).all():
            raise CheckFailed(f"returned {float(value)}, not a finite number")
        if value.grad_fn is None:
            raise CheckFailed("the value does not depend on the logits (no grad_fn): nothing to train")
        value.sum().backward()
        grad = logits.grad
        if grad is None or not torch.isfinite(grad).all() or not bool(grad.abs().sum() > 0):
            raise CheckFailed("no finite, non-zero gradient reaches the logits")
        kind = f"soft {shape(target)} probabilities" if soft else f"class indices {shape(target)}"
        return f"{kind}: loss {float(value):.4f}, gradient reaches the logits"

    return [
        Check("builds", builds, TORCH),
        Check("index targets", lambda: on_targets(False), TORCH),
        Check("soft targets", lambda: on_targets(True), TORCH),
    ]
