"""Images an export needs, from the run's own split: validation images (parity and the accuracy gate)
and a deterministic sample of training images (int8 calibration), preprocessed like the server will."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.errors import DataError
from thali.core.training.data import Sample, load_rgb, read_split, report_problems, verify_images


@dataclass
class ValidationSet:
    images: np.ndarray  # float32 (N, 3, H, W), preprocessed
    labels: np.ndarray  # int64 (N,)
    skipped: int
    problems: str | None


def split_root(run_dir: Path, data: str | Path | None) -> Path:
    """The data folder of a run: ``--data`` if given, else the root recorded in ``split.json``."""
    import json

    split = run_dir / "split.json"
    if not split.is_file():
        raise DataError(f"{run_dir}: no split.json; is this a training run directory?")
    root = Path(data) if data else Path(json.loads(split.read_text())["root"])
    if not root.is_dir():
        raise DataError(
            f"{root}: the run's data folder is not here; pass --data DIR (the folder the run was trained on)"
        )
    return root


def fingerprint(run_dir: Path) -> str:
    """sha256 of the run's split (every training and validation file, relative path and label)."""
    return hashlib.sha256((run_dir / "split.json").read_bytes()).hexdigest()


def _preprocess(samples: Sequence[Sample], transform: Any) -> tuple[np.ndarray, np.ndarray]:
    images = [transform(image=load_rgb(path))["image"].numpy() for path, _ in samples]
    return np.stack(images).astype(np.float32), np.array([label for _, label in samples], dtype=np.int64)


def load_validation(run_dir: Path, root: Path, transform: Any, progress: bool = False) -> ValidationSet:
    split = read_split(run_dir / "split.json", root)
    if not split.val:
        raise DataError(f"{run_dir}: the run has no validation split, so variants cannot be gated")
    good, problems = verify_images(split.val, progress=progress)
    if not good:
        raise DataError(f"{root}: none of the {len(split.val)} validation images could be read")
    images, labels = _preprocess(good, transform)
    return ValidationSet(images, labels, len(problems), report_problems(problems, "validation images"))


def calibration_batches(
    run_dir: Path, root: Path, transform: Any, count: int, seed: int = 0, batch_size: int = 16
) -> Iterator[np.ndarray]:
    """``count`` training images chosen with ``seed`` (stratified by shuffling), in batches; unreadable
    files are skipped."""
    train = list(read_split(run_dir / "split.json", root).train)
    random.Random(seed).shuffle(train)
    chosen, _ = verify_images(train[: min(count, len(train))])
    for start in range(0, len(chosen), batch_size):
        yield _preprocess(chosen[start : start + batch_size], transform)[0]
