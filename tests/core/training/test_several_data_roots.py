"""``thali train DOMAIN --data DIR --data DIR2`` (issue 28): several data roots merged by class name,
each root's manifest giving its photos' collections, a class folder that is not a class one error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_domain, write_tiny_imagefolder
from PIL import Image

from thali.core import load_config
from thali.core.errors import DataError
from thali.core.images import accepted_formats
from thali.core.training.data import make_split, read_samples, resolve_data_roots


def corrections(root: Path, classes: dict[str, int]) -> Path:
    """A folder like `thali feedback export` writes: some classes only, a HEIC among the JPEGs, and a
    manifest naming the feedback store as the collection."""
    accepted_formats()  # the HEIC encoder
    rng = np.random.default_rng(5)
    rows = ["file,class,source_repo,model_version,record"]
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            suffix, fmt = ("heic", "HEIF") if i == 0 else ("jpg", "JPEG")
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, fmt)
            (root / name / f"fb{i:03d}.{suffix}").write_bytes(buffer.getvalue())
            rows.append(f"{name}/fb{i:03d}.{suffix},{name},feedback:s3://store,1,r{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_roots_merge_by_class_name_and_keep_their_collections(tmp_path: Path, registries: object) -> None:
    photos = write_tiny_imagefolder(tmp_path / "photos", per_class=12, broken=False)
    rows = ["file,class,source_repo"] + [
        f"{p.parent.name}/{p.name},{p.parent.name},web{int(p.stem) % 2}"
        for p in sorted(photos.rglob("*.jpg"))
    ]
    (photos / "manifest.csv").write_text("\n".join(rows) + "\n")
    fixes = corrections(tmp_path / "fixes", {"green": 11, "red": 3})
    grouped = "\ndataset:\n  split: {val: 0.25, test: 0.0, seed: 1, group: {min_images: 10}}\n"
    config = load_config(write_tiny_domain(tmp_path / "cfg", grouped))
    roots = resolve_data_roots(config, [str(photos), str(fixes)])
    good, problems = read_samples(registries, config, roots)  # type: ignore[arg-type]
    assert problems == [] and len(good) == 36 + 14
    names = config.class_names
    assert sum(1 for p, label in good if p.parent == fixes / "green" and names[label] == "green") == 11
    assert any(p.suffix == ".heic" for p, _ in good)
    split, notes = make_split(config, roots, good)
    assert split.groups, notes  # a collection is held out per class where one is large enough
    # the corrections' collection is its own: green's 11 corrections can be its held-out group
    assert split.groups.get(names.index("green")) in {"web0", "web1", "feedback:s3://store"}
    assert all(p.parent.parent in (photos, fixes) for p, _ in split.train + split.val)


def test_a_folder_that_is_not_a_class_is_one_error_naming_it(tmp_path: Path, registries: object) -> None:
    photos = write_tiny_imagefolder(tmp_path / "photos", per_class=4, broken=False)
    stray = corrections(tmp_path / "fixes", {"green": 2, "purple": 2})
    config = load_config(write_tiny_domain(tmp_path / "cfg"))
    with pytest.raises(DataError, match=r"fixes: 'purple' is not a class of tiny \(its classes: blue, green"):
        read_samples(registries, config, [photos, stray])  # type: ignore[arg-type]


def test_one_data_root_reads_as_before(tmp_path: Path, registries: object) -> None:
    photos = write_tiny_imagefolder(tmp_path / "photos", per_class=4, broken=False)
    config = load_config(write_tiny_domain(tmp_path / "cfg"))
    assert resolve_data_roots(config, str(photos)) == [photos]
    one, _ = read_samples(registries, config, photos)  # type: ignore[arg-type]
    listed, _ = read_samples(registries, config, [photos])  # type: ignore[arg-type]
    assert one == listed and len(one) == 12
