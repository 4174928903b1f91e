"""Coordinate attention (Hou et al., 2021): channel attention that keeps position along H and W."""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def coordinate_attention(channels: int, reduction: int = 32, min_hidden: int = 8) -> Any:
    import torch
    from torch import nn

    hidden = max(min_hidden, channels // reduction)

    class CoordinateAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden))
            self.to_h = nn.Conv2d(hidden, channels, 1)
            self.to_w = nn.Conv2d(hidden, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.shape[2]
            along_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
            along_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
            y = self.reduce(torch.cat([along_h, along_w], dim=2))
            y = y * torch.clamp(y + 3.0, 0.0, 6.0) / 6.0  # hard-swish, export-safe
            y_h, y_w = y[:, :, :h], y[:, :, h:]
            a_h = torch.sigmoid(self.to_h(y_h))
            a_w = torch.sigmoid(self.to_w(y_w.transpose(2, 3)))
            return x * a_h * a_w

    return CoordinateAttention()


@hookimpl
def thali_register_attention(registry: Registry[Any]) -> None:
    registry.add("coord", coordinate_attention, description="coordinate attention (H and W aware)")
