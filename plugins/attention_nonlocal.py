"""Spatial self-attention: a non-local block (Wang et al., 2018), embedded-Gaussian form.

The output projection's BatchNorm starts at zero, so the block begins as the identity and does not
disturb pretrained features.
"""

from __future__ import annotations

from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def non_local(channels: int, reduction: int = 2) -> Any:
    import torch
    from torch import nn

    inner = max(8, channels // reduction)

    class NonLocal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Conv2d(channels, inner, 1)
            self.phi = nn.Conv2d(channels, inner, 1)
            self.g = nn.Conv2d(channels, inner, 1)
            norm = nn.BatchNorm2d(channels)
            nn.init.zeros_(norm.weight)
            self.out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), norm)
            self.scale = inner**-0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, inner)
            k = self.phi(x).flatten(2)  # (N, inner, HW)
            v = self.g(x).flatten(2).transpose(1, 2)  # (N, HW, inner)
            attn = torch.softmax(torch.bmm(q, k) * self.scale, dim=-1)
            y = torch.bmm(attn, v).transpose(1, 2).reshape(x.shape[0], -1, x.shape[2], x.shape[3])
            return x + self.out(y)

    return NonLocal()


@hookimpl
def thali_register_attention(registry: Registry[Any]) -> None:
    registry.add("non_local", non_local, description="non-local spatial self-attention block")
