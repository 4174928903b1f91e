"""Images an export needs, from the run's own split: validation images (parity and the accuracy gate)
and a deterministic sample of training images (int8 calibration), preprocessed like the server will."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.errors import DataError
from thali.core.images import DEFAULT_LIMITS, ImageLimits
from thali.core.inference.preprocess import Preprocessor
from thali.core.samples import Sample, report_problems, verify_images
from thali.core.training.data import Split, load_rgb, read_split

log = logging.getLogger("thali.export")


@dataclass
class ValidationSet:
    images: np.ndarray  # float32 (N, 3, H, W), preprocessed
    labels: np.ndarray  # int64 (N,)
    skipped: int
    problems: str | None
    indices: list[int] = field(default_factory=list)  # of each image in the split's ``val`` list


def run_split(run_dir: Path, data: str | Path | None) -> tuple[Split, Path]:
    """The run's split with paths under its data folder: ``--data`` if given, else the root recorded
    in ``split.json``."""
    path = run_dir / "split.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no split.json; is this a training run directory?")
    root = Path(data) if data else Path(json.loads(path.read_text())["root"])
    if not root.is_dir():
        raise DataError(
            f"{root}: the run's data folder is not here; pass --data DIR (the folder the run was trained on)"
        )
    return read_split(path, root), root


def fingerprint(run_dir: Path) -> str:
    """sha256 of the run's split: the classes and every training, validation and test file (relative
    path and label), in a canonical JSON form. Not the data folder's location (``root``) nor the file's
    formatting: the same split on another machine, or moved, has the same fingerprint."""
    split = json.loads((run_dir / "split.json").read_text())
    if not isinstance(split, dict):
        raise DataError(f"{run_dir / 'split.json'}: expected a JSON object")
    canonical = {key: split.get(key) for key in ("classes", "train", "val", "test", "val_cross")}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _apply(transform: Any, rgb: np.ndarray) -> np.ndarray:
    """A serving :class:`~thali.core.inference.Preprocessor` (torch-free, what ``thali bench`` uses) or
    the training evaluation transform (the same preprocessor with a tensor out, what the export gate
    uses)."""
    if isinstance(transform, Preprocessor):
        return transform(rgb)
    return transform(image=rgb)["image"].numpy()


def _preprocess(
    samples: Sequence[Sample], transform: Any, limits: ImageLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray | None, np.ndarray, list[tuple[Path, str]]]:
    """Decode and transform; an image that fails to decode (a truncated file passes the header check)
    is left out with its label and returned as ``(path, reason)``. Images are ``None`` if none decoded."""
    images, labels, problems = [], [], []
    for path, label in samples:
        try:
            decode = getattr(transform, "decode", load_rgb)  # serving's decode-and-resize where it has one
            rgb = decode(path, limits)
        except Exception as exc:  # any decoder error means: skip this file
            why = exc.message if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            problems.append((path, why))
            continue
        images.append(_apply(transform, rgb))
        labels.append(label)
    stacked = np.stack(images).astype(np.float32) if images else None
    return stacked, np.array(labels, dtype=np.int64), problems


def load_validation(
    split: Split, transform: Any, progress: bool = False, limits: ImageLimits = DEFAULT_LIMITS
) -> ValidationSet:
    """The run's validation images, preprocessed; unreadable ones are counted in ``skipped``."""
    if not split.val:
        raise DataError("the run has no validation split, so variants cannot be gated")
    good, problems = verify_images(split.val, progress=progress, limits=limits)
    images, labels, broken = _preprocess(good, transform, limits)
    problems += broken
    if images is None:
        raise DataError(f"none of the {len(split.val)} validation images could be read")
    position = {str(path): i for i, (path, _) in enumerate(split.val)}
    broken_paths = {str(path) for path, _ in broken}
    indices = [position[str(path)] for path, _ in good if str(path) not in broken_paths]
    return ValidationSet(
        images, labels, len(problems), report_problems(problems, "validation images"), indices
    )


def calibration_batches(
    split: Split,
    transform: Any,
    count: int,
    seed: int = 0,
    batch_size: int = 16,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Iterator[np.ndarray]:
    """``count`` training images chosen with ``seed``, in batches; unreadable files are skipped."""
    train = list(split.train)
    random.Random(seed).shuffle(train)
    problems: list[tuple[Path, str]] = []
    yield from preprocessed_batches(train[: min(count, len(train))], transform, limits, batch_size, problems)
    if message := report_problems(problems, "calibration images"):
        log.warning(message)


def preprocessed_batches(
    samples: Sequence[Sample],
    transform: Any,
    limits: ImageLimits = DEFAULT_LIMITS,
    batch_size: int = 32,
    problems: list[tuple[Path, str]] | None = None,
) -> Iterator[np.ndarray]:
    """``samples`` checked, decoded and preprocessed in batches (never all in memory); unreadable ones
    are skipped and, with ``problems``, recorded there as ``(path, reason)``."""
    for start in range(0, len(samples), batch_size):
        good, bad = verify_images(samples[start : start + batch_size], limits=limits)
        images, _, broken = _preprocess(good, transform, limits)
        if problems is not None:
            problems += bad + broken
        if images is not None:
            yield images
