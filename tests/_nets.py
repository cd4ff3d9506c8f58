"""Small networks following the tinydiff contract net(x_t, t), shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


class CondNet(nn.Module):
    """A class-conditional MLP: forward(x, t, class_labels=None) on flat data (bsz, dim); label num_classes is null."""

    def __init__(self, dim: int = 2, hidden: int = 32, num_classes: int | None = None) -> None:
        super().__init__()
        self.null_class = num_classes
        self.inp = nn.Linear(dim + 1, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.out = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        h = self.inp(torch.cat([x, (t / 1000.0)[:, None].to(x.dtype)], dim=1))
        if self.emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.null_class, device=x.device)
            h = h + self.emb(class_labels)
        return self.out(h)


def tiny_diffusers_unet(cls: type | None = None, out_channels: int = 2) -> nn.Module:
    """A seeded tiny diffusers UNet2DModel (2 channels, 8x8, two levels), or ``cls`` (a
    subclass) with the same arguments; diffusers must be installed."""
    import diffusers

    torch.manual_seed(0)
    return (cls or diffusers.UNet2DModel)(
        sample_size=8,
        in_channels=2,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
