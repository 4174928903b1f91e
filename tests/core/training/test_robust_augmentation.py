"""Cross-collection augmentations: JPEG re-encoding, blur, noise and random erasing (train only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_PREPROCESS

from thali.core import ConfigError, build_plugin_manager, check_components, load_config, resolve_domain
from thali.core.config import AugmentationConfig
from thali.core.training.transforms import eval_transform, train_transform

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PRE = TINY_PREPROCESS
ROBUST = {"jpeg_quality": (30, 95), "jpeg_prob": 1.0, "blur": 1.0, "noise": 1.0, "random_erasing": 1.0}
# the train pipeline of AugmentationConfig() before these options existed
BEFORE = [
    "RandomResizedCrop",
    "HorizontalFlip",
    "Rotate",
    "RandomBrightnessContrast",
    "ColorJitter",
    "Normalize",
    "ToTensorV2",
]


def image(h: int = 48, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def names(transform: object) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_robust_train_transform_runs_and_keeps_the_shape() -> None:
    aug = train_transform(AugmentationConfig(**ROBUST), PRE, seed=3)
    assert names(aug) == [
        *BEFORE[:5],
        "OneOf",  # blur
        "OneOf",  # noise
        "ImageCompression",
        "Normalize",
        "CoarseDropout",  # after normalisation: fill 0 is the mean colour
        "ToTensorV2",
    ]
    for _ in range(3):
        out = aug(image=image())["image"]
        assert tuple(out.shape) == (3, 32, 32) and str(out.dtype) == "torch.float32"
        assert np.isfinite(out.numpy()).all()
    evaluation, photo = eval_transform(PRE), image()
    # eval never augments: the same photo gives the same tensor, every time
    assert (evaluation(image=photo)["image"] == evaluation(image=photo)["image"]).all()


def test_all_new_options_off_is_the_pipeline_as_before() -> None:
    off = AugmentationConfig(jpeg_quality=None, jpeg_prob=0.5, blur=0.0, noise=0.0, random_erasing=0.0)
    assert off == AugmentationConfig()
    assert names(train_transform(off, PRE, seed=1)) == BEFORE
    # a JPEG quality with probability 0 adds nothing either
    assert names(train_transform(AugmentationConfig(jpeg_quality=(30, 95), jpeg_prob=0.0), PRE)) == BEFORE
    a = train_transform(off, PRE, seed=1)(image=image())["image"]
    b = train_transform(AugmentationConfig(), PRE, seed=1)(image=image())["image"]
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    ("field", "value"),
    [("blur", 1.5), ("noise", -0.1), ("random_erasing", 2), ("jpeg_prob", 1.1), ("jpeg_quality", "[0, 95]")],
)
def test_bad_value_is_one_error_naming_the_field(tmp_path: Path, field: str, value: object) -> None:
    path = tmp_path / "domain.yaml"
    path.write_text(f"name: demo\nclasses: [{{name: a}}, {{name: b}}]\naugmentation:\n  {field}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4: augmentation.{field}: ")
    assert list(info.value.errors) == [f"augmentation.{field}"]  # one error, naming the field


def test_jpeg_quality_must_be_ordered() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="1 <= min <= max <= 100"):
        AugmentationConfig(jpeg_quality=(90, 40))


def test_the_default_recipe_is_robust_and_the_plain_preset_restores_the_old_one() -> None:
    pm = build_plugin_manager(autoload=False)
    pack = resolve_domain(pm.registries, "south_asian_food")
    assert "plain" in pack.presets()
    robust = pack.load_config()  # chosen on the cross-collection split: the default since it helped there
    check_components(robust, pm.registries)
    a = robust.augmentation
    assert (a.jpeg_quality, a.jpeg_prob, a.blur, a.noise, a.random_erasing) == ((35, 95), 0.5, 0.2, 0.2, 0.25)
    assert a.random_resized_crop_scale == (0.25, 1.0) and robust.training.cache_views == 6
    plain = pack.load_config(presets=["plain"])
    p = plain.augmentation
    assert (p.jpeg_quality, p.blur, p.noise, p.random_erasing) == (None, 0.0, 0.0, 0.0)
    assert p.random_resized_crop_scale == (0.35, 1.0) and plain.training.cache_views == 4
    assert p.mixup_alpha == a.mixup_alpha  # unset keys keep domain.yaml's values
    assert plain.training.mode == robust.training.mode and plain.classes == robust.classes

    both = pack.load_config(presets=["cross_collection", "plain"])
    assert both.augmentation == plain.augmentation and both.training == plain.training
    assert both.dataset.split == pack.load_config(presets=["cross_collection"]).dataset.split
    assert both == pack.load_config(presets=["plain", "cross_collection"])  # disjoint keys: order-free
    assert robust.export.unknown.ood == ["ood_other_cuisines", "plant_disease"]
    names(train_transform(robust.augmentation, PRE))  # builds
