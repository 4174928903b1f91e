"""The data pipeline: where the data is, reading it through a dataset plugin, finding broken images,
a deterministic stratified split written beside the run, and a torch Dataset that skips bad files."""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import DomainConfig
from thali.core.errors import DataError
from thali.core.files import write_atomic
from thali.core.images import DEFAULT_LIMITS, ImageLimits, check_header, decode_rgb
from thali.core.registry import Registries

log = logging.getLogger("thali.data")
Sample = tuple[Path, int]


def resolve_data_root(config: DomainConfig, data: str | None = None) -> Path:
    """``--data``, else ``dataset.path``, else ``$THALI_DATA/<domain>`` or ``$THALI_DATA`` itself."""
    if data:
        return Path(data).expanduser()
    if config.dataset.path:
        return Path(config.dataset.path).expanduser()
    env = os.environ.get("THALI_DATA")
    if env:
        base = Path(env).expanduser()
        return base / config.name if (base / config.name).exists() else base
    raise DataError(
        f"{config.name}: no data location: pass --data DIR, set dataset.path in domain.yaml, "
        "or set $THALI_DATA"
    )


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


def read_samples(
    registries: Registries, config: DomainConfig, root: Path, progress: bool = False
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Read through the dataset plugin, then verify images; return good samples and all problems."""
    images = registries.datasets.create(
        config.dataset.name, root, classes=config.class_names, **config.dataset.params
    )
    if list(images.classes) != config.class_names:
        raise DataError(f"{root}: the dataset's classes do not match the config's classes")
    good, bad = verify_images(images.samples, progress=progress, limits=config.dataset.image_limits())
    return good, [*images.problems, *bad]


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for _, label in self.train:
            counts[label] += 1
        return counts


def stratified_split(samples: Sequence[Sample], val: float, test: float, seed: int) -> Split:
    """Per class: sort by path, shuffle with ``seed``, cut val and test fractions (rounded)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append((path, label))
    rng = random.Random(seed)
    split = Split([], [], [])
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s[0]))
        rng.shuffle(items)
        n_val = round(len(items) * val) if val > 0 else 0
        n_test = round(len(items) * test) if test > 0 else 0
        if len(items) >= 3:
            n_val = max(n_val, 1 if val > 0 else 0)
        split.val += items[:n_val]
        split.test += items[n_val : n_val + n_test]
        split.train += items[n_val + n_test :]
    return split


def write_split(path: Path, split: Split, root: Path, classes: Sequence[str]) -> None:
    """Write the split with paths relative to ``root``, so evaluation can be repeated elsewhere."""

    base = root.absolute()

    def rel(p: Path) -> str:
        p = Path(p).absolute()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    def rows(items: Sequence[Sample]) -> list[list[Any]]:
        return [[rel(p), label] for p, label in items]

    data = {"root": str(base), "classes": list(classes)}
    data.update({name: rows(getattr(split, name)) for name in ("train", "val", "test")})
    write_atomic(path, json.dumps(data, indent=1))


def read_split(path: Path, root: Path | None = None) -> Split:
    data = json.loads(path.read_text())
    base = Path(root or data["root"])
    return Split(*([(base / p, int(label)) for p, label in data[name]] for name in ("train", "val", "test")))


def load_rgb(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (EXIF orientation applied), within ``limits``."""
    return decode_rgb(path, limits)


class ImageDataset:
    """A map-style dataset of ``(tensor, label)``; an unreadable or over-limit image yields ``None``
    (skipped)."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[..., Any], limits: ImageLimits = DEFAULT_LIMITS
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.limits)
        except Exception as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        return self.transform(image=image)["image"], label, index


def collate_skip_broken(batch: Sequence[tuple[Any, int, int] | None]) -> dict[str, Any]:
    """Stack the good items; count the ``None`` ones as skipped."""
    import torch

    good = [b for b in batch if b is not None]
    if not good:
        return {"images": None, "labels": None, "indices": None, "skipped": len(batch)}
    return {
        "images": torch.stack([g[0] for g in good]),
        "labels": torch.tensor([g[1] for g in good], dtype=torch.long),
        "indices": torch.tensor([g[2] for g in good], dtype=torch.long),
        "skipped": len(batch) - len(good),
    }


def _seed_worker(worker_id: int) -> None:
    import torch

    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int,
    sampler: Any = None,
    drop_last: bool = False,
) -> Any:
    """A DataLoader whose order and augmentation depend only on ``seed`` (exact resume)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if num_workers == 0 and hasattr(dataset.transform, "set_random_seed"):
        dataset.transform.set_random_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip_broken,
        worker_init_fn=_seed_worker,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
    )


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
