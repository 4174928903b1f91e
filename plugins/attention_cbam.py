"""CBAM (Woo et al., 2018): channel attention (avg + max pooled MLP), then spatial attention.

Max pooling is a global ``amax`` rather than adaptive max pooling, so the module exports to ONNX.
"""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def cbam(channels: int, reduction: int = 16, kernel_size: int = 7) -> Any:
    import torch
    from torch import nn

    hidden = max(8, channels // reduction)

    class CBAM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(
                nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
            )
            self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            avg = x.mean(dim=(2, 3), keepdim=True)
            peak = x.amax(dim=(2, 3), keepdim=True)
            x = x * torch.sigmoid(self.mlp(avg) + self.mlp(peak))
            maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
            return x * torch.sigmoid(self.spatial(maps))

    return CBAM()


@hookimpl
def thali_register_attention(registry: Registry[Any]) -> None:
    registry.add("cbam", cbam, description="CBAM: channel then spatial attention")
