"""Dataset readers: ImageFolder layout (one folder per class)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import DataError
from thali.core.registry import Registry

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class LabelledImages:
    """Image paths with class indices, plus the problems found while reading."""

    classes: list[str]
    samples: list[tuple[Path, int]]
    problems: list[tuple[Path, str]] = field(default_factory=list)


def image_folder(root: str | Path, classes: Sequence[str] | None = None) -> LabelledImages:
    """Read an ImageFolder tree. With ``classes`` given, every class must have a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder (set dataset.path, --data or $THALI_DATA)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(
            f"{root}: no folder for class(es) {', '.join(missing)}; found {', '.join(found) or 'none'}"
        )
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    return LabelledImages(classes=list(classes), samples=samples)


@hookimpl
def thali_register_datasets(registry: Registry[Any]) -> None:
    registry.add("imagefolder", image_folder, description="one sub-folder of images per class")
