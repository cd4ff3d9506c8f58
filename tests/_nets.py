"""Small networks following the tinydiff network contract, for tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """forward(x, t, class_labels=None) on flat data (bsz, dim); label num_classes is null."""

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
