"""ECA (Wang et al., 2020): channel attention with a 1-D convolution across channels, no reduction."""

from __future__ import annotations

import math
from typing import Any

from thali.core import hookimpl
from thali.core.registry import Registry


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """The paper's adaptive kernel size: odd, growing with log2(channels)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def eca(channels: int, kernel_size: int | None = None) -> Any:
    import torch
    from torch import nn

    k = kernel_size or eca_kernel_size(channels)

    class ECA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.mean(dim=(2, 3)).unsqueeze(1)  # (N, 1, C)
            y = torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)  # (N, C, 1, 1)
            return x * y

    return ECA()


@hookimpl
def thali_register_attention(registry: Registry[Any]) -> None:
    registry.add("eca", eca, description="ECA: efficient channel attention (1-D conv)")
