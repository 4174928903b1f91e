"""The training loss a domain config names, built from its plugin and held to the hookspec's contract.

``thali_register_losses`` promises that a factory may return any callable ``loss(logits, target) ->
scalar tensor``: a plain function works as well as a ``torch.nn.Module``. This module wraps either into
a module (so it moves to the training device with the model) and tries it once on a tiny batch before
training starts, so a loss that breaks the contract is one line naming its plugin, not a traceback in
the middle of an epoch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from thali.core.config import DomainConfig
from thali.core.errors import PluginError, one_line
from thali.core.registry import Registries, accepts

log = logging.getLogger("thali.loss")
CONTRACT = "see thali_register_losses in thali.core.hookspecs"


class LossFunction(nn.Module):
    """A plain callable loss as a module; an ``nn.Module`` loss is kept as a sub-module (its buffers,
    such as class weights, move with ``.to(device)``)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, target)


def build_loss(config: DomainConfig, registries: Registries, class_counts: Sequence[int]) -> nn.Module:
    """``factory(num_classes, class_counts=..., **params)`` for ``config.loss``, checked on a tiny batch."""
    section, num_classes = config.loss, len(config.classes)
    entry = registries.losses.get(section.name)
    params = dict(section.params)
    if accepts(entry.factory, "label_smoothing"):
        params.setdefault("label_smoothing", section.label_smoothing)
    elif section.label_smoothing:
        log.info("loss %s takes no label_smoothing: loss.label_smoothing is not used", section.name)
    fn = registries.losses.create(section.name, num_classes, class_counts=list(class_counts), **params)
    if not callable(fn):
        raise PluginError(
            f"loss {section.name!r} ({entry.who}) returned {type(fn).__name__}, not a callable "
            f"loss(logits, target); {CONTRACT}"
        )
    module = fn if isinstance(fn, nn.Module) else LossFunction(fn)
    _probe(module, section.name, entry.who, num_classes, soft=_mixes(config))
    return module


def _mixes(config: DomainConfig) -> bool:
    a = config.augmentation
    return a.mix_prob > 0 and (a.mixup_alpha > 0 or a.cutmix_alpha > 0)


def _probe(loss: nn.Module, name: str, who: str, num_classes: int, soft: bool) -> None:
    logits = torch.zeros(2, num_classes, requires_grad=True)
    targets = {"class-index": torch.tensor([0, num_classes - 1])}
    if soft:  # under mixup/cutmix the target is a (N, K) probability matrix
        targets["soft (mixup/cutmix)"] = torch.full((2, num_classes), 1.0 / num_classes)
    for kind, target in targets.items():
        try:
            value = loss(logits, target)
        except Exception as exc:
            raise PluginError(
                f"loss {name!r} ({who}) failed on (2, {num_classes}) logits with {kind} targets: "
                f"{one_line(exc, 200)}"
            ) from exc
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PluginError(
                f"loss {name!r} ({who}) returned {got} for {kind} targets; a loss must return a scalar "
                f"tensor; {CONTRACT}"
            )
        if not bool(torch.isfinite(value.detach()).all()):
            raise PluginError(
                f"loss {name!r} ({who}) returned {value.item()} for {kind} targets on zero logits"
            )
        if not value.requires_grad:
            raise PluginError(f"loss {name!r} ({who}) returned a value with no gradient to the logits")
