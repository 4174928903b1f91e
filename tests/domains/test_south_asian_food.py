from __future__ import annotations

from pathlib import Path

from thali.core import build_plugin_manager, check_components, resolve_domain


def test_domain_config_is_valid() -> None:
    pm = build_plugin_manager(autoload=False)
    config = resolve_domain(pm.registries, "south_asian_food").load_config()
    check_components(config, pm.registries)
    assert len(config.classes) == 27
    assert config.model.backbone == "tf_efficientnet_lite0"


def test_classes_match_the_shared_dataset(datasets_root: Path) -> None:
    pm = build_plugin_manager(autoload=False)
    config = resolve_domain(pm.registries, "south_asian_food").load_config()
    folders = sorted(p.name for p in (datasets_root / "south_asian_food").iterdir() if p.is_dir())
    assert config.class_names == folders


def test_gpu_presets_for_b3_and_b4() -> None:
    pm = build_plugin_manager(autoload=False)
    pack = resolve_domain(pm.registries, "south_asian_food")
    assert pack.presets() == [
        "cross_collection",
        "efficientnet_b3_gpu",
        "efficientnet_b4_gpu",
        "full_finetune_gpu",
        "plain",
    ]
    for preset, backbone in (
        ("efficientnet_b3_gpu", "efficientnet_b3"),
        ("efficientnet_b4_gpu", "efficientnet_b4"),
    ):
        config = pack.load_config(presets=[preset])
        check_components(config, pm.registries)
        assert (config.model.backbone, config.model.pretrained, config.training.mode) == (
            backbone,
            "hub",
            "full",
        )
        assert len(config.classes) == 27  # the rest of domain.yaml is kept


def test_full_finetune_gpu_preset_keeps_lite0_offline_and_the_recipe() -> None:
    """The GPU preset measured on the cross-collection split: every layer trains, the offline Lite0
    weights stay (no download), and it stacks with cross_collection as docs/results.md ran it."""
    pm = build_plugin_manager(autoload=False)
    pack = resolve_domain(pm.registries, "south_asian_food")
    default = pack.load_config()
    config = pack.load_config(presets=["cross_collection", "full_finetune_gpu"])
    check_components(config, pm.registries)
    assert (config.model.backbone, config.model.pretrained, config.training.mode) == (
        "tf_efficientnet_lite0",
        "offline",
        "full",
    )
    assert config.augmentation.cutmix_alpha == 1.0 and config.training.epochs == 80
    assert config.augmentation.jpeg_quality == default.augmentation.jpeg_quality  # capture degradations
    assert config.model.attention == default.model.attention
    assert config.dataset.split.group is not None  # cross_collection's grouped split is kept
