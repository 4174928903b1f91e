"""The data pipeline: where the data is, reading it through a dataset plugin, finding broken images,
a deterministic split written beside the run (stratified, or holding out whole photo collections per
class from a provenance manifest), and a torch Dataset that skips bad files."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from thali.core.config import DomainConfig, GroupConfig
from thali.core.errors import ConfigError, DataError
from thali.core.files import read_bounded, write_atomic
from thali.core.images import DEFAULT_LIMITS, ImageLimits, decode_rgb
from thali.core.registry import Registries
from thali.core.samples import Sample, verify_images

if TYPE_CHECKING:
    import torch

log = logging.getLogger("thali.data")


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


def resolve_data_roots(config: DomainConfig, data: str | Sequence[str] | None = None) -> list[Path]:
    """Every data root of a run: ``--data`` (repeatable: the first is the main one, whose split and
    manifest rule as before), else the one of :func:`resolve_data_root`."""
    if isinstance(data, str | Path) or not data:
        return [resolve_data_root(config, str(data) if data else None)]
    return [Path(d).expanduser() for d in data]


def read_samples(
    registries: Registries,
    config: DomainConfig,
    root: Path | Sequence[Path],
    progress: bool = False,
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Read through the dataset plugin, then verify images; return good samples and all problems.

    With several roots (``thali train --data A --data B``) they are merged by class name: the first
    must hold every class (as a single root must), a later one any of them (the corrections of
    ``thali feedback export``); a class folder of a later root that is not a class of the domain is one
    :class:`DataError` naming it."""
    roots = [root] if isinstance(root, Path) else list(root)
    names = config.class_names
    samples: list[Sample] = []
    problems: list[tuple[Path, str]] = []
    for i, folder in enumerate(roots):
        images = registries.datasets.create(
            config.dataset.name, folder, classes=names if i == 0 else None, **config.dataset.params
        )
        found = list(images.classes)
        if i == 0 and found != names:
            raise DataError(f"{folder}: the dataset's classes do not match the config's classes")
        strangers = [c for c in found if c not in names]
        if strangers:
            raise DataError(
                f"{folder}: {', '.join(repr(c) for c in strangers)} "
                f"{'is not a class' if len(strangers) == 1 else 'are not classes'} of {config.name} "
                f"(its classes: {', '.join(names)})"
            )
        samples += [(path, names.index(found[label])) for path, label in images.samples]
        problems += images.problems
    good, bad = verify_images(samples, progress=progress, limits=config.dataset.image_limits())
    return good, [*problems, *bad]


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    # cross-collection validation: indices into ``val`` of the images whose whole collection (group) was
    # held out of training, and that group per class index; both empty for a random split
    val_cross: list[int] = field(default_factory=list)
    groups: dict[int, str] = field(default_factory=dict)

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for _, label in self.train:
            counts[label] += 1
        return counts


def _random_cut(items: list[Sample], val: float, test: float, split: Split) -> None:
    """Add one class's shuffled ``items`` to ``split``: val and test fractions (rounded), rest train."""
    n_val = round(len(items) * val) if val > 0 else 0
    n_test = round(len(items) * test) if test > 0 else 0
    if len(items) >= 3:
        n_val = max(n_val, 1 if val > 0 else 0)
    split.val += items[:n_val]
    split.test += items[n_val : n_val + n_test]
    split.train += items[n_val + n_test :]


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
        _random_cut(items, val, test, split)
    return split


# --- cross-collection split -------------------------------------------------------------------

UNKNOWN_GROUP = "unknown"  # an image the manifest does not list; never held out as a group
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_ROWS = 1_000_000
MAX_GROUP_CHARS = 200  # a group key is shown in notes and split.json; manifest values are cut to this
FIELD = "dataset.split.group"


def _pick_group(
    sizes: Counter[str], n: int, val: float, n_test: int, min_images: int, rng: random.Random
) -> str | None:
    """The group to hold out of a class of ``n`` images: the one whose size is closest to ``val * n``
    (``rng`` breaks ties), among those with ``min_images`` or more that leave training at least half
    of the class; ``None`` when no group qualifies."""
    names = sorted(sizes)
    rng.shuffle(names)
    eligible = [g for g in names if sizes[g] >= min_images and n - sizes[g] - n_test >= 0.5 * n]
    if not eligible:
        return None
    return min(eligible, key=lambda g: abs(sizes[g] - val * n))  # first of equals: the shuffled order


def grouped_split(
    samples: Sequence[Sample],
    groups: Sequence[str],
    val: float,
    test: float,
    seed: int,
    min_images: int = 1,
) -> Split:
    """A split that measures the model on photo collections it never trained on.

    ``groups[i]`` is the collection of ``samples[i]``. For each class with images from two or more known
    groups, one whole group is the class's validation set (see :func:`_pick_group`); its other groups
    are training images, minus a random ``test`` fraction. A class with a single known group (or none
    that qualifies) gets the random cut of :func:`stratified_split`, the very same for the same seed.
    Images of the group ``unknown`` are never held out. ``val_cross`` lists the held-out images.
    """
    if len(groups) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
    if val <= 0:
        return stratified_split(samples, val, test, seed)
    by_class: dict[int, list[tuple[Sample, str]]] = defaultdict(list)
    for (path, label), group in zip(samples, groups, strict=True):
        by_class[label].append(((path, label), group))
    rng = random.Random(seed)  # consumed exactly as stratified_split does: one shuffle per class
    split = Split([], [], [])
    for label in sorted(by_class):
        pairs = sorted(by_class[label], key=lambda s: str(s[0][0]))
        rng.shuffle(pairs)
        items = [sample for sample, _ in pairs]
        n = len(items)
        n_test = round(n * test) if test > 0 else 0
        sizes = Counter(g for _, g in pairs if g != UNKNOWN_GROUP)
        held = None
        if len(sizes) >= 2:
            held = _pick_group(sizes, n, val, n_test, min_images, random.Random(f"thali:{seed}:{label}"))
        if held is None:
            _random_cut(items, val, test, split)
            continue
        rest = [sample for sample, g in pairs if g != held]
        start = len(split.val)
        split.val += [sample for sample, g in pairs if g == held]
        split.val_cross += range(start, len(split.val))
        split.groups[label] = held
        split.test += rest[:n_test]
        split.train += rest[n_test:]
    return split


def data_folder(root: Path) -> Path:
    """The folder the data lives in: ``root`` itself, or the folder of a manifest file."""
    root = Path(root)
    return root.parent if root.is_file() else root


def _manifest_file(group: GroupConfig, root: Path) -> Path:
    folder = data_folder(root)
    path = folder / group.manifest
    if not path.exists():
        raise DataError(f"{FIELD}.manifest: no file {group.manifest!r} in the data folder {folder}")
    real, base = path.resolve(), folder.resolve()
    if not real.is_relative_to(base):
        raise DataError(f"{FIELD}.manifest: {group.manifest!r} resolves outside the data folder ({real})")
    if not real.is_file():
        raise DataError(f"{FIELD}.manifest: {path} is not a regular file")
    return real


def _manifest_rows(path: Path, max_bytes: int, max_rows: int) -> tuple[list[str], Iterator[dict[Any, Any]]]:
    """The header and rows (read as they are used) of an untrusted CSV, within ``max_bytes`` and
    ``max_rows``; a malformed file is a one-line DataError."""
    try:
        raw = read_bounded(path, max_bytes, "group manifest")
    except DataError as exc:
        raise DataError(f"{FIELD}.manifest: {exc.message}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{FIELD}.manifest: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))

    def malformed(exc: csv.Error) -> DataError:
        return DataError(f"{FIELD}.manifest: {path}: near line {reader.line_num + 1}: {exc}")

    try:
        header = [str(name) for name in reader.fieldnames or []]
    except csv.Error as exc:
        raise malformed(exc) from None

    def rows() -> Iterator[dict[Any, Any]]:
        try:
            for count, row in enumerate(reader, start=1):
                if count > max_rows:
                    raise DataError(f"{FIELD}.manifest: {path}: more than {max_rows:,} rows; refusing it")
                yield row
        except csv.Error as exc:
            raise malformed(exc) from None

    return header, rows()


def _plain_relative(value: str) -> str | None:
    """A manifest's file value as a clean relative POSIX path, or ``None`` if it could leave the folder."""
    value = value.strip().replace("\\", "/")
    if not value or "\x00" in value or value.startswith(("/", "~")):
        return None
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _cell(row: dict[Any, Any], column: str, limit: int = MAX_GROUP_CHARS) -> str:
    value = row.get(column)  # None for a short row; a list under the key None holds a long row's extras
    return value.strip()[:limit] if isinstance(value, str) else ""


def read_groups(
    group: GroupConfig,
    root: Path,
    samples: Sequence[Sample],
    max_bytes: int = MAX_MANIFEST_BYTES,
    max_rows: int = MAX_MANIFEST_ROWS,
) -> tuple[list[str], list[str]]:
    """The group of every sample from the manifest ``group`` names (``unknown`` for images it does
    not list), and notes on what was ignored. The manifest is untrusted: it is read bounded, only its
    relative paths inside the data folder are looked up, and no file it names is ever opened."""
    path = _manifest_file(group, root)
    header, rows = _manifest_rows(path, max_bytes, max_rows)
    wanted = [("file_column", group.file_column)]
    wanted += [(f"columns[{i}]", c) for i, c in enumerate(group.columns)]
    if group.styles:
        wanted.append(("styles.column", group.styles.column))
    for name, column in wanted:
        if column not in header:
            shown = ", ".join(header[:20]) + (", …" if len(header) > 20 else "")
            raise ConfigError(
                f"{FIELD}.{name}: no column {column!r} in {path} (columns: {shown or 'none'})",
                errors={f"{FIELD}.{name}": f"no column {column!r} in the manifest"},
            )
    styles = group.styles
    compiled = [(n, re.compile(p)) for n, p in styles.patterns.items()] if styles else []
    by_file: dict[str, str] = {}
    outside = conflicts = 0
    for row in rows:
        rel = _plain_relative(_cell(row, group.file_column, limit=4096))
        if rel is None:
            outside += 1
            continue
        values = [_cell(row, c) for c in group.columns]
        key = "|".join(values) if any(values) else UNKNOWN_GROUP
        if styles and key != UNKNOWN_GROUP and (not styles.groups or key in styles.groups):
            name = _cell(row, styles.column).replace("\\", "/").rsplit("/", 1)[-1]
            key += next((f"#{style}" for style, pattern in compiled if pattern.search(name)), "#other")
        if by_file.setdefault(rel, key) != key:
            conflicts += 1
    keys = _sample_keys(samples, data_folder(root))
    found = [by_file.get(k, UNKNOWN_GROUP) if k else UNKNOWN_GROUP for k in keys]
    missing = sum(1 for k in keys if k not in by_file)
    unused = len(by_file.keys() - set(keys))
    name = group.manifest
    notes = []
    if missing:
        notes.append(f"{missing} image(s) are not in {name}: group {UNKNOWN_GROUP!r}, never held out")
    if outside:
        notes.append(f"{name}: ignored {outside} row(s) whose file is not a relative path inside the folder")
    if conflicts:
        notes.append(f"{name}: {conflicts} repeated row(s) name another group for a file; the first counts")
    if unused:
        notes.append(f"{name}: {unused} listed file(s) are not among the dataset's images (ignored)")
    return found, notes


def _sample_keys(samples: Sequence[Sample], folder: Path) -> list[str | None]:
    """Each sample's path relative to ``folder`` (POSIX), ``None`` for one outside it."""
    plain, real = folder.absolute(), folder.resolve()
    keys: list[str | None] = []
    for path, _ in samples:
        path = Path(path).absolute()
        if not path.is_relative_to(plain):  # a reader that resolved links (csv), or a path elsewhere
            path, base = path.resolve(), real
        else:
            base = plain
        keys.append(path.relative_to(base).as_posix() if path.is_relative_to(base) else None)
    return keys


def make_split(
    config: DomainConfig, root: Path | Sequence[Path], samples: Sequence[Sample]
) -> tuple[Split, list[str]]:
    """The split the config asks for, and notes on it: stratified, or cross-collection with a group.
    With several roots each one's photos get their groups from its own manifest; a later root without
    one is a collection of its own (named by its folder)."""
    s = config.dataset.split
    if s.group is None:
        return stratified_split(samples, s.val, s.test, s.seed), []
    roots = [root] if isinstance(root, Path) else list(root)
    groups, notes = (
        read_groups(s.group, roots[0], samples)
        if len(roots) == 1
        else _merged_groups(s.group, roots, samples)
    )
    split = grouped_split(samples, groups, s.val, s.test, s.seed, s.group.min_images)
    notes = [*notes, grouping_note(split, config.class_names)]
    if s.group.exclude_from_training:
        notes.append(exclude_from_training(split, samples, groups, s.group.exclude_from_training))
    return split, notes


def _merged_groups(
    group: GroupConfig, roots: Sequence[Path], samples: Sequence[Sample]
) -> tuple[list[str], list[str]]:
    """:func:`read_groups` per root, each on the photos under it; the first root claims what is in
    several."""
    found = [UNKNOWN_GROUP] * len(samples)
    claimed: set[int] = set()
    notes: list[str] = []
    for n, root in enumerate(roots):
        keys = _sample_keys(samples, data_folder(root))
        mine = [i for i, key in enumerate(keys) if key is not None and i not in claimed]
        claimed.update(mine)
        subset = [samples[i] for i in mine]
        if n and not _manifest_file(group, root).is_file():
            values = [f"{root.name}"] * len(subset)
        else:
            values, more = read_groups(group, root, subset)
            notes += [f"{root}: {note}" for note in more] if n else more
        for i, value in zip(mine, values, strict=True):
            found[i] = value
    return found, notes


def exclude_from_training(
    split: Split, samples: Sequence[Sample], groups: Sequence[str], names: Sequence[str]
) -> str:
    """Drop from ``split.train`` the photos of the collections ``names`` (a group, or the source part
    before ``#`` of one); validation and test stay as they are. A note says what went."""
    wanted = set(names)
    group = {Path(p): g for (p, _), g in zip(samples, groups, strict=True)}

    def excluded(path: Path) -> bool:
        g = group.get(Path(path), "")
        return g in wanted or g.split("#", 1)[0] in wanted

    before = len(split.train)
    split.train = [(p, label) for p, label in split.train if not excluded(p)]
    left = before - len(split.train)
    unused = sorted(n for n in wanted if not any(g == n or g.split("#", 1)[0] == n for g in groups))
    if not split.train:
        raise DataError("dataset.split.group.exclude_from_training: no training photos are left")
    text = (
        f"exclude_from_training: {left} training photos of {', '.join(sorted(wanted))} left out "
        "(validation unchanged)"
    )
    return text + (f"; no photos of {', '.join(unused)} in the manifest" if unused else "")


def grouping_note(split: Split, classes: Sequence[str]) -> str:
    """One line on what a cross-collection split held out."""
    held = len(split.groups)
    if not held:
        return "cross-collection validation: no class has two collections to hold one out; random split"
    return (
        f"cross-collection validation: {held} of {len(classes)} classes hold out a whole collection "
        f"({len(split.val_cross)} of {len(split.val)} validation images); the rest use a random cut"
    )


def write_split(path: Path, split: Split, root: Path, classes: Sequence[str]) -> None:
    """Write the split with paths relative to ``root``, so evaluation can be repeated elsewhere."""

    base = root.absolute()

    def rel(p: Path) -> str:
        p = Path(p).absolute()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    def rows(items: Sequence[Sample]) -> list[list[Any]]:
        return [[rel(p), label] for p, label in items]

    data: dict[str, Any] = {"root": str(base), "classes": list(classes)}
    data.update({name: rows(getattr(split, name)) for name in ("train", "val", "test")})
    if split.groups:  # a random split's file stays as it always was
        data["val_cross"] = list(split.val_cross)
        data["groups"] = {classes[label]: group for label, group in sorted(split.groups.items())}
    write_atomic(path, json.dumps(data, indent=1))


def read_split(path: Path, root: Path | None = None) -> Split:
    """A ``split.json``; files from before cross-collection splits read with empty ``val_cross``."""
    data = json.loads(path.read_text())
    base = Path(root or data["root"])

    def part(name: str) -> list[Sample]:
        return [(base / p, int(label)) for p, label in data[name]]

    split = Split(part("train"), part("val"), part("test"))
    cross, groups = data.get("val_cross") or [], data.get("groups") or {}
    classes = list(data.get("classes") or [])
    if not (isinstance(cross, list) and all(type(i) is int and 0 <= i < len(split.val) for i in cross)):
        raise DataError(f"{path}: val_cross must list indices into val")
    if not (isinstance(groups, dict) and all(k in classes and isinstance(v, str) for k, v in groups.items())):
        raise DataError(f"{path}: groups must map class names to group names")
    split.val_cross = sorted(set(cross))
    split.groups = {classes.index(name): group for name, group in groups.items()}
    return split


def load_rgb(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (EXIF orientation applied), within ``limits``."""
    return decode_rgb(path, limits)


class ImageDataset:
    """A map-style dataset of ``(tensor, label)``; an unreadable or over-limit image yields ``None``
    (skipped). A transform with a ``decode(path, limits)`` method (the evaluation transform) decodes the
    file itself (reduced-scale JPEG decoding, as serving); any other gets the full-size RGB image."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[..., Any], limits: ImageLimits = DEFAULT_LIMITS
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.limits = limits
        self.load: Callable[[Path, ImageLimits], np.ndarray] = getattr(transform, "decode", load_rgb)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        path, label = self.samples[index]
        try:
            image = self.load(path, self.limits)
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
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def as_torch_dataset(dataset: ImageDataset) -> torch.utils.data.Dataset[Any]:
    """``dataset`` as torch's annotations want it: torch types a loader's or sampler's dataset as its
    ``Dataset`` class, but reads only ``len()`` and ``[i]``, which a map-style :class:`ImageDataset` has
    (it does not subclass ``Dataset``, so importing this module needs no torch)."""
    return cast("torch.utils.data.Dataset[Any]", dataset)


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
        as_torch_dataset(dataset),
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
