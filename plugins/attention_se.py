"""Squeeze-and-Excitation (Hu et al., 2018): channel attention from global average pooling."""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def squeeze_excitation(channels: int, reduction: int = 16, min_hidden: int = 8) -> Any:
    """An SE block that keeps its input shape ``(N, channels, H, W)``."""
    import torch
    from torch import nn

    hidden = max(min_hidden, channels // reduction)

    class SqueezeExcitation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.expand = nn.Conv2d(hidden, channels, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.mean(dim=(2, 3), keepdim=True)
            return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))

    return SqueezeExcitation()


@hookimpl
def thali_register_attention(registry: Registry[Any]) -> None:
    registry.add("se", squeeze_excitation, description="Squeeze-and-Excitation channel attention")
