"""Model assembly: backbone + attention (after stages and/or on the last feature map) + head.

Also decides what is frozen: ``training.mode`` full / partial / frozen_features, with
``trainable_stages`` counting from the end. The frozen prefix (stem + first stages) can be run once
and cached, see :mod:`thali.core.training.features`.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

from thali.core.config import DomainConfig
from thali.core.errors import ConfigError
from thali.core.registry import Registries

from .backbone import FeatureBackbone, as_feature_backbone, check_output

log = logging.getLogger("thali.model")


class Prefix(nn.Module):
    """The frozen part: stem and the first ``n`` stages."""

    def __init__(self, backbone: FeatureBackbone, n: int) -> None:
        super().__init__()
        self.backbone, self.n = backbone, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_until(x, self.n)


class Classifier(nn.Module):
    """``backbone -> attention -> global average pool -> dropout -> linear``."""

    def __init__(
        self,
        backbone: FeatureBackbone,
        attention: list[nn.Module],
        num_classes: int,
        dropout: float,
        frozen_stages: int = 0,
        freeze_head: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.attention = nn.Sequential(*attention)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.num_features, num_classes)
        self.frozen_stages = frozen_stages
        self.freeze_head = freeze_head
        self.preprocess = dict(backbone.preprocess)
        self._apply_freeze()

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages <= 0 and not self.freeze_head:
            return []
        mods: list[nn.Module] = [self.backbone.stem, *self.backbone.stages[: self.frozen_stages]]
        if self.freeze_head and self.frozen_stages >= len(self.backbone.stages):
            mods.append(self.backbone.head)
        return mods

    def _apply_freeze(self) -> None:
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    @property
    def cache_depth(self) -> int:
        """How many stages the cacheable prefix covers (``len(stages) + 1`` = the head too)."""
        n = len(self.backbone.stages)
        return n + 1 if self.freeze_head and self.frozen_stages >= n else self.frozen_stages

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.frozen_modules():  # frozen BatchNorm keeps its statistics
            module.eval()
        return self

    def prefix(self) -> nn.Module:
        if self.cache_depth > len(self.backbone.stages):
            return nn.Sequential(Prefix(self.backbone, len(self.backbone.stages)), self.backbone.head)
        return Prefix(self.backbone, self.cache_depth)

    def forward_cached(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features the frozen prefix produced."""
        if self.cache_depth > len(self.backbone.stages):
            x = features
        else:
            x = self.backbone.forward_from(features, self.cache_depth)
        return self.classify(x)

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.attention(feature_map).mean(dim=(2, 3))
        return self.fc(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone(x))


def _attention(registries: Registries, name: str, channels: int, params: dict[str, Any]) -> nn.Module:
    """The attention module ``name`` for ``channels``. Its contract is a ``torch.nn.Module``
    (:class:`thali.core.AttentionModule` only says what thali calls, to keep torch out of the plugin
    API); ``nn.Sequential`` refuses anything else when the model is put together."""
    return cast(nn.Module, registries.attention.create(name, channels, **params))


def build_classifier(
    config: DomainConfig, registries: Registries, num_classes: int | None = None
) -> Classifier:
    """Build the model a domain config describes (weights from ``model.pretrained``)."""
    num_classes = num_classes or len(config.classes)
    m = config.model
    params = {**m.params, **({"drop_path_rate": m.drop_path_rate} if m.drop_path_rate else {})}
    entry = registries.backbones.get(m.backbone)
    made = registries.backbones.create(m.backbone, pretrained=m.pretrained, **params)
    backbone = as_feature_backbone(made, m.backbone, entry.who, entry.metadata)
    check_output(backbone, m.backbone, entry.who)
    n_stages = len(backbone.stages)
    if backbone is not made:
        log.info(
            "backbone %s is a plain module: one stage (training.trainable_stages and attention after "
            "stages apply to it as a whole; a FeatureBackbone with stages allows more)",
            m.backbone,
        )
    head_attention: list[nn.Module] = []
    first_attention_stage = n_stages
    for i, placement in enumerate(m.attention):
        if placement.where == "head":
            head_attention.append(
                _attention(registries, placement.name, backbone.num_features, placement.params)
            )
            continue
        for s in placement.stages:
            if not 0 <= s < n_stages:
                raise ConfigError(
                    f"model.attention[{i}].stages: stage {s} does not exist; "
                    f"{m.backbone} has stages 0..{n_stages - 1}"
                )
            module = _attention(registries, placement.name, backbone.stage_channels[s], placement.params)
            backbone.stages[s] = nn.Sequential(backbone.stages[s], module)
            first_attention_stage = min(first_attention_stage, s)

    t = config.training
    if t.mode == "full":
        frozen, freeze_head = 0, False
    else:
        frozen = max(0, n_stages - t.trainable_stages)
        freeze_head = t.trainable_stages == 0
        if first_attention_stage < frozen:  # new attention modules must train
            log.info("attention after stage %d: training from there on", first_attention_stage)
            frozen, freeze_head = first_attention_stage, False
    model = Classifier(backbone, head_attention, num_classes, m.head_dropout, frozen, freeze_head)
    if m.eval_crop_pct is not None:  # the domain knows better than the backbone how its photos are framed
        model.preprocess["crop_pct"] = float(m.eval_crop_pct)
    return model
