from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_tiny_domain

from thali.core import ConfigError, load_config
from thali.core.training.model import build_classifier


def _config(tmp_path: Path, *overrides: str) -> object:
    return load_config(write_tiny_domain(tmp_path), list(overrides))


def test_attention_after_stages_and_on_the_head(tmp_path: Path, registries: object) -> None:
    import torch

    config = _config(
        tmp_path, "model.attention=[{name: eca, where: stages, stages: [0]}, {name: cbam}, {name: se}]"
    )
    model = build_classifier(config, registries)
    assert type(model.backbone.stages[0][1]).__name__ == "ECA"
    assert [type(m).__name__ for m in model.attention] == ["CBAM", "SqueezeExcitation"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_bad_stage_index_names_the_field(tmp_path: Path, registries: object) -> None:
    config = _config(tmp_path, "model.attention=[{name: se, where: stages, stages: [7]}]")
    with pytest.raises(ConfigError, match=r"model.attention\[0\].stages: stage 7 does not exist"):
        build_classifier(config, registries)


@pytest.mark.parametrize(("trainable", "depth"), [(0, 3), (1, 1)])
def test_frozen_prefix_and_cached_forward_match_the_full_forward(
    tmp_path: Path, registries: object, trainable: int, depth: int
) -> None:
    import torch

    config = _config(tmp_path, "training.mode=frozen_features", f"training.trainable_stages={trainable}")
    model = build_classifier(config, registries).eval()
    assert model.cache_depth == depth
    frozen = {id(p) for m in model.frozen_modules() for p in m.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) in frozen)
    assert all(p.requires_grad for p in model.fc.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_cached(model.prefix()(x)), model(x))
    model.train()
    assert not model.backbone.stem.training and model.fc.training


def test_a_domain_can_keep_the_whole_photo_at_evaluation(tmp_path: Path, registries: object) -> None:
    import numpy as np

    from thali.core.training.transforms import eval_transform

    default = build_classifier(_config(tmp_path), registries).preprocess
    whole = build_classifier(_config(tmp_path, "model.eval_crop_pct=1.0"), registries).preprocess
    assert whole["crop_pct"] == 1.0 and whole["crop_pct"] != default["crop_pct"]
    # a mark at the photo's edge survives the whole-photo view and is cut by the default crop
    photo = np.zeros((64, 64, 3), dtype=np.uint8)
    photo[:, -3:] = 255
    assert eval_transform(whole)(image=photo)["image"][:, :, -1].max() > 0.9
    assert eval_transform(default)(image=photo)["image"][:, :, -1].max() < 0
    with pytest.raises(ConfigError, match=r"model\.eval_crop_pct"):
        _config(tmp_path, "model.eval_crop_pct=0.2")
