"""Small networks following the tinydiff contract net(x_t, t), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small MLP for vectors: net(x (bsz, D), t (bsz,)) -> (bsz, out_mult * D)."""

    def __init__(self, dim: int = 2, out_mult: int = 1, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim * out_mult)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None] / 1000.0], dim=1))


class TinyConvNet(nn.Module):
    """A small conv net for images: (bsz, C, H, W) -> (bsz, out_mult * C, H, W)."""

    def __init__(self, channels: int = 1, out_mult: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels * out_mult, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tmap = (t / 1000.0)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, tmap], dim=1))
