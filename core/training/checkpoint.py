"""Checkpoints: written atomically every epoch (``last.pt``) and when validation improves
(``best.pt``), with everything ``--resume`` needs to continue exactly (optimiser, scheduler, scaler,
EMA, early-stopping state, RNG states)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
