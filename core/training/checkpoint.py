"""Checkpoints: written atomically every epoch (``last.pt``) and when validation improves
(``best.pt``), with everything ``--resume`` needs to continue exactly (optimiser, scheduler, scaler,
EMA, early-stopping state, RNG states).

A checkpoint holds plain data only (tensors, numbers, strings, lists, tuples, dicts) and is read with
``torch.load(weights_only=True)``: a run folder is untrusted input, and a crafted ``.pt`` must never run
code. A file that needs more than plain data to load is refused, never unpickled.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thali.core.errors import DataError, one_line
from thali.core.files import write_atomic

LAST_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "rng")
STATE_KEYS = ("epoch", "best", "best_epoch", "bad_epochs", "history")


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, recursively."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):  # a namedtuple too: its class would need code to rebuild
        return tuple(plain(v) for v in value)
    return value


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Serialise ``payload`` in memory, then write it with :func:`thali.core.files.write_atomic`."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "name": str(name),
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    random.setstate(state["python"])
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load(path: Path, need: Sequence[str] = ("model",)) -> dict[str, Any]:
    """The plain-data checkpoint at ``path`` (on the CPU), holding at least the keys ``need``.

    Read with ``weights_only=True``: a file that would need to run code to load (a crafted pickle, a
    checkpoint from before thali stored plain data only) is refused with a one-line :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if called := re.search(r"GLOBAL ([\w.]+)", text):
            raise DataError(
                f"{path}: refused: not a thali checkpoint (loading it would run {called[1]}; "
                "thali checkpoints hold plain data only, so this one is crafted or from an older thali)"
            ) from None
        reason = next(
            (ln.strip() for ln in text.split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()), ""
        )
        raise DataError(f"{path}: unreadable checkpoint, not a thali checkpoint ({reason[:200]})") from None
    except Exception as exc:
        raise DataError(f"{path}: unreadable checkpoint ({one_line(exc, 240)})") from None
    if not isinstance(saved, dict) or missing(saved, need):
        what = f"no {', '.join(missing(saved, need))}" if isinstance(saved, dict) else type(saved).__name__
        raise DataError(f"{path}: not a thali checkpoint ({what})")
    return saved


def missing(saved: dict[str, Any], need: Sequence[str]) -> list[str]:
    return [key for key in need if key not in saved]


def load_weights(module: nn.Module, weights: Any, path: Path) -> None:
    """``module.load_state_dict(weights)``, a mismatch reported as one line naming ``path``."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise DataError(f"{path}: the weights do not fit this model ({one_line(exc, 240)})") from None


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
            "state": plain(state),
            "rng": rng_state(),
            **plain(extra),
        }
        save_atomic(payload, path)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load ``path`` into the parts and the RNGs; return the loop state saved with it."""
        if not Path(path).is_file():
            raise DataError(f"{path}: no checkpoint to resume from")
        saved = load(path, LAST_KEYS)
        load_weights(self.model, saved["model"], path)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            if self.ema and saved.get("ema"):
                self.ema.load_state_dict(saved["ema"])
            set_rng_state(saved["rng"])
            state = saved["state"]
            if not isinstance(state, dict) or missing(state, STATE_KEYS) or type(state["epoch"]) is not int:
                raise ValueError("no loop state")
        except (
            RuntimeError,
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
            IndexError,
            OverflowError,
        ) as exc:
            raise DataError(f"{path}: cannot resume from this checkpoint ({one_line(exc, 240)})") from None
        return state
