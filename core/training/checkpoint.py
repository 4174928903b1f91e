"""Checkpoints: written atomically every epoch (``last.pt``) and when validation improves
(``best.pt``), with everything ``--resume`` needs to continue exactly (optimiser, scheduler, scaler,
EMA, early-stopping state, RNG states)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thali.core.errors import ThaliError


def save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ThaliError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ThaliError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


@dataclass
class TrainingParts:
    """Everything whose state ``--resume`` restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: Any = None

    def save(self, path: Path, state: dict[str, Any], **extra: Any) -> None:
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "state": state,
            "rng": rng_state(),
            **extra,
        }
        save_atomic(payload, path)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load ``path`` into the parts and the RNGs; return the loop state saved with it."""
        saved = load(path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        set_rng_state(saved["rng"])
        return saved["state"]
