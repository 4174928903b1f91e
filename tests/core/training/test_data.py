from __future__ import annotations

from collections import Counter
from pathlib import Path

from helpers import TINY_PREPROCESS

from thali.core.training.data import (
    ImageDataset,
    collate_skip_broken,
    read_split,
    stratified_split,
    verify_images,
    write_split,
)
from thali.core.training.transforms import eval_transform, train_transform

PRE = TINY_PREPROCESS


def test_broken_image_is_reported_and_skipped(tiny_data: Path, registries: object) -> None:
    images = registries.datasets.create("imagefolder", tiny_data, classes=["blue", "green", "red"])
    good, bad = verify_images(images.samples)
    assert len(good) == 30 and len(bad) == 1
    assert bad[0][0].name == "zz_broken.jpg" and "cannot identify image" in bad[0][1]


def test_a_file_that_breaks_mid_epoch_is_skipped_not_raised(tiny_data: Path, tmp_path: Path) -> None:
    victim = tmp_path / "vanished.jpg"
    victim.write_bytes((tiny_data / "blue" / "000.jpg").read_bytes())
    samples = [(tiny_data / "blue" / "001.jpg", 0), (victim, 0)]
    dataset = ImageDataset(samples, eval_transform(PRE))
    victim.write_bytes(b"\xff\xd8 truncated")  # broken after the scan
    batch = collate_skip_broken([dataset[0], dataset[1]])
    assert batch["skipped"] == 1 and batch["images"].shape == (1, 3, 32, 32)


def test_split_is_stratified_deterministic_and_written(
    tiny_data: Path, registries: object, tmp_path: Path
) -> None:
    images = registries.datasets.create("imagefolder", tiny_data, classes=["blue", "green", "red"])
    good, _ = verify_images(images.samples)
    first = stratified_split(good, val=0.2, test=0.1, seed=7)
    again = stratified_split(list(reversed(good)), val=0.2, test=0.1, seed=7)
    assert first == again
    assert Counter(label for _, label in first.val) == {0: 2, 1: 2, 2: 2}
    assert Counter(label for _, label in first.test) == {0: 1, 1: 1, 2: 1}
    assert len(first.train) + len(first.val) + len(first.test) == 30
    assert stratified_split(good, val=0.2, test=0.1, seed=8).val != first.val
    write_split(tmp_path / "split.json", first, tiny_data, ["blue", "green", "red"])
    assert read_split(tmp_path / "split.json") == first


def test_csv_manifest_reader(tiny_data: Path, registries: object, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label\n"
        f"{tiny_data}/blue/000.jpg,blue\n"
        f"{tiny_data}/red/000.jpg,red\n"
        f"{tiny_data}/red/missing.jpg,red\n"
        f"{tiny_data}/green/000.jpg,purple\n"
    )
    images = registries.datasets.create("csv", manifest, classes=["blue", "green", "red"])
    assert [(p.name, label) for p, label in images.samples] == [("000.jpg", 0), ("000.jpg", 2)]
    reasons = [why for _, why in images.problems]
    assert reasons == ["line 4: file not found", "line 5: unknown label 'purple'"]


def test_augmentation_changes_images_and_eval_is_deterministic(tiny_data: Path) -> None:
    import numpy as np

    from thali.core.config import AugmentationConfig
    from thali.core.training.data import load_rgb

    image = load_rgb(tiny_data / "green" / "000.jpg")
    aug = train_transform(AugmentationConfig(), PRE, seed=1)
    a, b = aug(image=image)["image"], aug(image=image)["image"]
    assert a.shape == (3, 32, 32) and not np.allclose(a.numpy(), b.numpy())
    ev = eval_transform(PRE)
    np.testing.assert_array_equal(ev(image=image)["image"].numpy(), ev(image=image)["image"].numpy())
