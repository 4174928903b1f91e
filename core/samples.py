"""Labelled samples of an image folder, checked before anything decodes them: shared by training, the
export engine and ``thali evaluate`` of a registry model (which runs without torch). Nothing here
imports torch or training code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thali.core.errors import DataError
from thali.core.images import DEFAULT_LIMITS, ImageLimits, check_header
from thali.core.registry import Registries

__all__ = ["Sample", "report_problems", "scoring_samples", "verify_images"]

#: ``(path, class_index)``
Sample = tuple[Path, int]


def verify_images(
    samples: Sequence[Sample], progress: bool = False, limits: ImageLimits = DEFAULT_LIMITS
) -> tuple[list[Sample], list[Any]]:
    """Check every image's header against ``limits`` (no pixel is decoded); return the good samples and
    ``(path, reason)`` for the rest: broken, empty, too large, or too many pixels (a bomb)."""
    from tqdm import tqdm

    good, bad = [], []
    for path, label in tqdm(samples, desc="checking images", unit="img", disable=not progress, leave=False):
        try:
            check_header(path, limits)
            good.append((path, label))
        except DataError as exc:
            bad.append((path, exc.message))
        except Exception as exc:  # any decoder error means: skip this file
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return good, bad


def report_problems(problems: Sequence[tuple[Path, str]], what: str = "images") -> str | None:
    """One line naming how many files were skipped and the first few paths."""
    if not problems:
        return None
    first = "; ".join(f"{p} ({why})" for p, why in problems[:3])
    return f"skipped {len(problems)} unreadable {what}: {first}" + (" …" if len(problems) > 3 else "")


def scoring_samples(
    registries: Registries, data_dir: Path, classes: Sequence[str], owner: str
) -> list[Sample]:
    """The images of an ImageFolder ``data_dir`` to score a model of ``classes`` on: every sub-folder
    must be one of the classes (a subset is fine), labels are the model's class indices."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data folder")
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise DataError(f"{data_dir}: folders {', '.join(unknown)} are not classes of {owner}")
    images = registries.datasets.create("imagefolder", data_dir, classes=folders)
    return [(p, list(classes).index(folders[label])) for p, label in images.samples]
