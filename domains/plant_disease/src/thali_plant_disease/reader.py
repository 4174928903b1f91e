"""A dataset reader for the PlantVillage folder layout.

PlantVillage (Hughes & Salathé 2015) ships one folder per crop and disease, named ``Crop___Disease``
(``Potato___Early_blight``, ``Tomato___Tomato_Yellow_Leaf_Curl_Virus``, ``Potato___healthy``), and
many of its redistributions hold the same photo more than once (train/val/test copies next to the
originals). This reader:

* maps folder names to thali class names: ``Potato___Early_blight`` -> ``potato_early_blight``
  (lower case, runs of non-alphanumerics to ``_``); folders already in that form are taken as they are,
  so the curated copy in ``../shared/datasets/plant_disease`` and a raw PlantVillage download both work;
* keeps only the crops asked for (``dataset.params.crops: [potato]``);
* skips exact duplicate files (same bytes), reporting each as a problem instead of training on it twice
  or letting a copy leak between training and validation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from thali.core.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass
class PlantImages:
    classes: list[str]
    samples: list[tuple[Path, int]]
    problems: list[tuple[Path, str]] = field(default_factory=list)


def class_name(folder: str) -> str:
    """``Potato___Early_blight`` -> ``potato_early_blight``; ``Corn_(maize)___healthy`` ->
    ``corn_maize_healthy``."""
    return re.sub(r"[^a-z0-9]+", "_", folder.lower()).strip("_")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_plantvillage(
    root: str | Path,
    classes: Sequence[str] | None = None,
    crops: Sequence[str] | None = None,
    dedupe: bool = True,
) -> PlantImages:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such PlantVillage folder (set dataset.path, --data or $THALI_DATA)")
    folders: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = class_name(sub.name)
        if crops and not any(name.startswith(class_name(c) + "_") for c in crops):
            continue
        if name in folders:
            raise DataError(
                f"{root}: folders {folders[name].name!r} and {sub.name!r} both map to class {name!r}"
            )
        folders[name] = sub
    wanted = list(classes) if classes is not None else sorted(folders)
    missing = [c for c in wanted if c not in folders]
    if missing:
        found = ", ".join(sorted(folders)) or "none"
        raise DataError(f"{root}: no folder for class(es) {', '.join(missing)}; found {found}")
    samples: list[tuple[Path, int]] = []
    problems: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for index, name in enumerate(wanted):
        for path in sorted(folders[name].rglob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file() or path.is_symlink():
                continue
            if dedupe:
                digest = _sha256(path)
                if digest in seen:
                    problems.append((path, f"exact copy of {seen[digest].relative_to(root)}; skipped"))
                    continue
                seen[digest] = path
            samples.append((path, index))
    if not samples:
        raise DataError(f"{root}: no images found for {', '.join(wanted)}")
    return PlantImages(classes=wanted, samples=samples, problems=problems)
