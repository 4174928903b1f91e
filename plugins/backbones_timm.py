"""EfficientNet backbones through timm (B0-B4 and Lite0-2).

Metadata is a static table so that registering does not import timm; the factory imports it.
"""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.errors import NotAvailableError
from thali.core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# name: (input size, crop_pct, mean, std, weight sources)
_MODELS: dict[str, tuple[int, float, tuple[float, ...], tuple[float, ...], tuple[str, ...]]] = {
    "efficientnet_b0": (224, 0.875, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b1": (240, 0.882, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b2": (260, 0.890, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b3": (300, 0.904, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b4": (380, 0.922, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "tf_efficientnet_lite0": (224, 0.875, HALF, HALF, ("offline", "hub")),
    "tf_efficientnet_lite1": (240, 0.882, HALF, HALF, ("offline", "hub")),
    "tf_efficientnet_lite2": (260, 0.890, HALF, HALF, ("offline", "hub")),
}


def make_timm_backbone(model_name: str) -> Any:
    def factory(num_classes: int = 0, pretrained: str = "none", **params: Any) -> Any:
        import timm

        if pretrained != "none":
            raise NotAvailableError(
                f"{model_name}: pretrained={pretrained!r} is not available yet; use pretrained: none"
            )
        model = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="", **params)
        return model

    return factory


@hookimpl
def thali_register_backbones(registry: Registry[Any]) -> None:
    for name, (size, crop, mean, std, weights) in _MODELS.items():
        registry.add(
            name,
            make_timm_backbone(name),
            description=f"timm {name}",
            metadata={
                "input_size": (3, size, size),
                "crop_pct": crop,
                "mean": mean,
                "std": std,
                "interpolation": "bicubic",
                "weights": weights,
                "licence": "Apache-2.0 (timm); ImageNet-trained weights: research use",
            },
        )
