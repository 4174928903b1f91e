"""The same checks for every registered backbone and attention module, third-party ones included:
output shape, backward pass, and ONNX export whose ONNX Runtime output equals torch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import onnx_roundtrip

from thali.core import build_plugin_manager

REGISTRIES = build_plugin_manager().registries
BACKBONES = [e.name for e in REGISTRIES.backbones if not e.metadata.get("family")]
ATTENTION = [e.name for e in REGISTRIES.attention]


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("channels", [16, 96])
def test_attention_keeps_shape_and_backpropagates(name: str, channels: int) -> None:
    import torch

    module = REGISTRIES.attention.create(name, channels)
    x = torch.randn(3, channels, 7, 5, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert any(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_exports_to_onnx_with_parity(name: str, tmp_path: Path) -> None:
    import torch

    module = REGISTRIES.attention.create(name, 32)
    with torch.no_grad():  # make the zero-initialised parts non-trivial
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.eval()
    x = torch.randn(2, 32, 7, 7)
    ours = onnx_roundtrip(module, x, tmp_path / f"{name}.onnx")
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def _small_input(name: str) -> int:
    return 64


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_features_backward_and_onnx_parity(name: str, tmp_path: Path) -> None:
    import torch

    backbone = REGISTRIES.backbones.create(name, pretrained="none")
    meta = REGISTRIES.backbones.get(name).metadata
    assert backbone.preprocess["input_size"] == tuple(meta["input_size"])
    assert tuple(backbone.preprocess["mean"]) == tuple(meta["mean"])
    assert len(backbone.stage_channels) == len(backbone.stages)

    x = torch.randn(2, 3, 64, 64)
    backbone.train()
    feats = backbone(x)
    assert feats.shape[:2] == (2, backbone.num_features) and feats.dim() == 4
    feats.mean().backward()
    assert all(p.grad is not None for p in backbone.stem.parameters())

    backbone.eval()
    ours = onnx_roundtrip(backbone, x, tmp_path / f"{name}.onnx")
    with torch.no_grad():
        ref = backbone(x).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-3)
