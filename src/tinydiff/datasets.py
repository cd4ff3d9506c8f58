"""Toy 2D data sets generated in code (no downloads), scaled to roughly unit variance."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "eight_gaussians", "make_toy", "swiss_roll", "two_moons"]


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> Tensor:
    """The 2D swiss roll: points on the spiral r = theta, theta in [1.5 pi, 4.5 pi], (n, 2)."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / 8.0
    return x + noise * torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, generator: torch.Generator | None = None, std: float = 0.08) -> Tensor:
    """Eight Gaussians on a circle of radius 1.5, (n, 2)."""
    k = torch.randint(0, 8, (n,), generator=generator).float()
    centers = 1.5 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.06) -> Tensor:
    """Two interleaving half circles, centred, (n, 2)."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.2
    return pts + noise * torch.randn(n, 2, generator=generator)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "swiss_roll": swiss_roll,
    "eight_gaussians": eight_gaussians,
    "two_moons": two_moons,
}
"""The 2-d toy data sets by name, as [`make_toy`][tinydiff.datasets.make_toy] and the demo's
`--dataset` choose them."""


def make_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw n points of a named toy data set (see :data:`TOY_DATASETS`), (n, 2) float32."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return TOY_DATASETS[name](n, generator)
