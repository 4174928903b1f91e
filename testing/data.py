"""Checks of dataset readers and domain packs; neither needs torch.

Dataset reader (``thali_register_datasets``): ``factory(root, **params)`` and ``factory(root,
classes=[...], **params)`` on a tiny data set made in a temporary folder. It holds three classes
(``blue``, ``green``, ``red``) of small JPEGs laid out three common ways at once, so that a reader of
any of them finds its files:

* class folders: ``root/red/red_000.jpg`` (ImageFolder), plus one broken file ``root/red/red_broken.jpg``;
* class-prefixed file names in the root: ``root/red_100.jpg``, plus ``root/red_broken.jpg``;
* a manifest: ``root/manifest.csv`` with ``path,label`` rows for the class folders' files.

The result must have ``classes`` (names, in the order asked for when ``classes`` is given),
``samples`` (``(path, class_index)`` pairs: existing files inside ``root``, each labelled with the class
its file name starts with, every class with at least one sample) and ``problems`` (``(path, reason)``
pairs). A broken file may be listed as a sample (thali's pipeline finds and skips it) or as a problem,
but must not make the reader raise. A reader of another layout fails here with its own message.

Domain pack (``thali_register_domains``): ``factory()`` returns a :class:`~thali.core.domains.DomainPack`
of the registered name, its config and presets validate, and every component they name is registered.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from thali.core.registry import Entry

from .checks import Check, CheckFailed, needed, params_of

DATASET_OPTIONS = frozenset({"params"})
DOMAIN_OPTIONS: frozenset[str] = frozenset()
CLASSES = ("blue", "green", "red")
ORDER = ["red", "blue", "green"]  # a given order that is not the sorted one
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
PER_CLASS = 4


def write_tiny_dataset(root: Path) -> Path:
    """Write the tiny data set described in the module docstring into ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            for rel in (f"{name}/{name}_{i:03d}.jpg", f"{name}_{100 + i:03d}.jpg"):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / rel, quality=90)
            rows.append(f"{name}/{name}_{i:03d}.jpg,{name}")
    for rel in ("red/red_broken.jpg", "red_broken.jpg"):
        (root / rel).write_bytes(b"this is not an image")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _pairs(value: Any, what: str) -> list[tuple[Any, Any]]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise CheckFailed(f"{what} must be a list of pairs, got {type(value).__name__}")
    for item in value:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise CheckFailed(f"{what} must hold pairs, found {item!r}")
    return [tuple(item) for item in value]


def validate_dataset(result: Any, root: Path, expected: Sequence[str] | None) -> str:
    """Check a reader's result against the tiny data set in ``root``; a one-line summary."""
    for attribute in ("classes", "samples", "problems"):
        if not hasattr(result, attribute):
            raise CheckFailed(f"the result ({type(result).__name__}) has no {attribute!r}")
    classes = result.classes
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise CheckFailed(f"classes must be a list of names, got {type(classes).__name__}")
    classes = list(classes)
    if not all(isinstance(c, str) for c in classes):
        raise CheckFailed(f"classes must be strings, got {classes!r}")
    if expected is not None and classes != list(expected):
        raise CheckFailed(
            f"asked for classes {list(expected)}, got {classes}; thali needs them in that order"
        )
    if expected is None and (not classes or not set(classes) <= set(CLASSES)):
        raise CheckFailed(f"classes {classes}: expected some of {list(CLASSES)}")
    base = root.resolve()
    seen: dict[str, int] = dict.fromkeys(classes, 0)
    in_folders = False
    for path, index in _pairs(result.samples, "samples"):
        if not isinstance(index, Integral) or isinstance(index, bool) or not 0 <= int(index) < len(classes):
            raise CheckFailed(f"sample {path}: class index {index!r} is not in 0..{len(classes) - 1}")
        try:
            file = Path(path)
            rel = file.resolve().relative_to(base)
        except (TypeError, ValueError):
            raise CheckFailed(f"sample {path!r} is not a path inside the data root {root}") from None
        if not file.is_file():
            raise CheckFailed(f"sample {rel} does not exist")
        truth = file.name.split("_", 1)[0]
        if truth in CLASSES and classes[int(index)] != truth:
            raise CheckFailed(f"sample {rel} is labelled {classes[int(index)]!r}, its class is {truth!r}")
        seen[classes[int(index)]] += 1
        in_folders = in_folders or len(rel.parts) > 1
    empty = [c for c, n in seen.items() if n == 0]
    if empty:
        raise CheckFailed(f"no samples for class(es) {', '.join(empty)} (the data set has {PER_CLASS} each)")
    problems = _pairs(result.problems, "problems")
    layout = "class folders" if in_folders else "files in the root"
    total = sum(seen.values())
    return f"{len(classes)} classes, {total} samples, {len(problems)} problems ({layout})"


def dataset_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    params = params_of(options)

    def read(classes: Sequence[str] | None) -> str:
        with tempfile.TemporaryDirectory(prefix="thali-check-") as tmp:
            root = write_tiny_dataset(Path(tmp) / "data")
            kwargs = {**params, **({"classes": list(classes)} if classes is not None else {})}
            result = entry.factory(root, **kwargs)
            return validate_dataset(result, root, classes)

    return [
        Check("reads a tiny data set", lambda: read(None)),
        Check(f"classes={ORDER}", lambda: read(ORDER)),
    ]


def domain_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    from thali.core.config import check_components
    from thali.core.domains import DomainPack

    state: dict[str, Any] = {}

    def builds() -> str:
        pack = entry.factory()
        if not isinstance(pack, DomainPack):
            raise CheckFailed(
                f"the factory returned {type(pack).__name__}, not a thali.core.domains.DomainPack"
            )
        if pack.name != entry.name:
            raise CheckFailed(f"the pack is named {pack.name!r} but registered as {entry.name!r}")
        if not pack.config_path.is_file():
            raise CheckFailed(f"{pack.config_path}: no such file")
        state["pack"] = pack
        return f"{pack.config_path}"

    def configs() -> str:
        pack = needed(state, "pack", "builds")
        loaded = {"domain.yaml": pack.load_config()}
        for preset in pack.presets():
            loaded[f"preset {preset}"] = pack.load_config(presets=[preset])
        state["configs"] = loaded
        config = loaded["domain.yaml"]
        presets = f"; {len(loaded) - 1} preset(s) valid" if len(loaded) > 1 else ""
        return f"{len(config.classes)} classes, backbone {config.model.backbone}{presets}"

    def components() -> str:
        loaded = needed(state, "configs", "config")
        for where, config in loaded.items():
            try:
                check_components(config, registries)
            except Exception as exc:
                message = getattr(exc, "message", str(exc))
                raise CheckFailed(f"{where}: {message}") from None
        config = loaded["domain.yaml"]
        named = [config.dataset.name, config.model.backbone, config.loss.name]
        named += [a.name for a in config.model.attention]
        named += [v for v in config.export.variants if v != "fp32"]
        return "registered: " + ", ".join(dict.fromkeys(named))

    return [
        Check("builds", builds),
        Check("config", configs),
        Check("components exist", components),
    ]
