"""Optimiser (AdamW, SGD with momentum), per-step learning-rate schedule with warmup, weight EMA."""

from __future__ import annotations

import copy
import math
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from thali.core.config import OptimizerConfig, ScheduleConfig

M = TypeVar("M", bound=nn.Module)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation weights (1-D parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    floor = min(1.0, cfg.min_lr / base_lr)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return max(floor, cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs))
    total = max(1, epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, epochs, base_lr)
    )


class ModelEma(Generic[M]):
    """Exponential moving average of a model's weights (buffers copied as they are).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that a short run
    is not dominated by the initial weights (a fixed 0.998 would still hold 2/3 of a freshly
    initialised head after 200 steps).
    """

    def __init__(self, model: M, decay: float) -> None:
        self.module: M = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
