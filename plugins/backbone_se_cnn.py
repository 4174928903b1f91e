"""A compact CNN with Squeeze-and-Excitation blocks, trained from scratch.

The seed's "baseline CNN" (no pretrained weights needed) and, with a small ``width``, the fast model
for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import ConfigError
from thali.core.registry import Registry

PREPROCESS = {
    "input_size": (3, 160, 160),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def se_cnn(
    num_classes: int = 0,
    pretrained: str = "none",
    width: int = 32,
    num_stages: int = 4,
    input_size: int = 160,
    **params: Any,
) -> Any:
    """Stem + ``num_stages`` stages (stride-2 conv, conv, SE) doubling the width each stage."""
    from torch import nn

    from thali.core.training.backbone import FeatureBackbone, load_checkpoint
    from thali.plugins.attention_se import squeeze_excitation

    if params:
        raise ConfigError(f"model.params: se_cnn does not take {', '.join(sorted(params))}")

    def conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    stem = conv(3, width, 2)
    stages, channels, cin = [], [], width
    for i in range(num_stages):
        cout = width * 2 ** (i + 1)
        stages.append(nn.Sequential(conv(cin, cout, 2), conv(cout, cout), squeeze_excitation(cout)))
        channels.append(cout)
        cin = cout
    features = cin * 2
    head = conv(cin, features, 1, k=1)
    backbone = FeatureBackbone(
        stem,
        stages,
        head,
        num_features=features,
        stage_channels=channels,
        preprocess={**PREPROCESS, "input_size": (3, input_size, input_size)},
    )
    if pretrained != "none":
        load_checkpoint(Path(pretrained).expanduser(), backbone)
    return backbone


@hookimpl
def thali_register_backbones(registry: Registry[Any]) -> None:
    registry.add(
        "se_cnn",
        se_cnn,
        description="compact CNN with SE blocks, trained from scratch (params: width, num_stages)",
        metadata={**PREPROCESS, "weights": ("none",), "licence": "Apache-2.0 (thali)"},
    )
