"""Dataset readers: ImageFolder layout (one folder per class) and a CSV manifest (``path,label``).

Readers only list files; decoding problems are found, reported and skipped by the training pipeline.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import DataError
from thali.core.images import FORMAT_TYPES
from thali.core.registry import Registry

#: the suffixes of every format the decoder takes (HEIC and AVIF too: corrections from phones)
IMAGE_EXTENSIONS = frozenset(f".{suffix}" for suffixes, _ in FORMAT_TYPES.values() for suffix in suffixes)


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
    if not samples:
        raise DataError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return LabelledImages(classes=list(classes), samples=samples)


def csv_manifest(
    root: str | Path,
    classes: Sequence[str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
) -> LabelledImages:
    """Read a CSV manifest with a header; paths are relative to the manifest's folder."""
    manifest = Path(root)
    if manifest.is_dir():
        manifest = manifest / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such manifest file")
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for column in (path_column, label_column):
            if column not in header:
                raise DataError(f"{manifest}: no column {column!r}; columns: {', '.join(header)}")
        rows = [(row[path_column], row[label_column], n) for n, row in enumerate(reader, start=2)]
    names = list(classes) if classes is not None else sorted({label for _, label, _ in rows})
    index = {name: i for i, name in enumerate(names)}
    samples, problems = [], []
    for rel, label, line in rows:
        path = (manifest.parent / rel).resolve()
        if label not in index:
            problems.append((path, f"line {line}: unknown label {label!r}"))
        elif not path.is_file():
            problems.append((path, f"line {line}: file not found"))
        else:
            samples.append((path, index[label]))
    if not samples:
        raise DataError(f"{manifest}: no usable rows ({len(problems)} problems)")
    return LabelledImages(classes=names, samples=samples, problems=problems)


@hookimpl
def thali_register_datasets(registry: Registry[Any]) -> None:
    registry.add("imagefolder", image_folder, description="one sub-folder of images per class")
    registry.add(
        "csv",
        csv_manifest,
        description="CSV manifest with path,label columns (params: path_column, label_column)",
    )
