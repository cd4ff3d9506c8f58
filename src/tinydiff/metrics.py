"""Sample-quality metrics."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    r"""Sliced 2-Wasserstein distance between two point clouds (Rabin et al. 2011).

    :math:`\mathrm{SW}_2(x, y) = \big(\mathbb E_\theta\, W_2^2(\theta^\top x, \theta^\top y)\big)^{1/2}`
    over random unit directions :math:`\theta`; each 1D distance compares sorted projections
    (quantiles, linearly interpolated when the sizes differ).

    Args:
        x: (n, *shape) samples.
        y: (m, *shape) samples of the same event shape.
        num_projections: number of random directions.
        generator: for the directions (reproducible values).

    Returns:
        The distance, a Python float.
    """
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"event shapes differ: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("sliced_wasserstein needs at least 2 points in each set")
    a = x.reshape(x.shape[0], -1).double().cpu()
    b = y.reshape(y.shape[0], -1).double().cpu()
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    n = max(a.shape[0], b.shape[0])
    q = torch.linspace(0, 1, n, dtype=torch.float64)
    qa, qb = _quantiles(pa, q), _quantiles(pb, q)
    return float(((qa - qb) ** 2).mean().sqrt())


def _quantiles(sorted_vals: Tensor, q: Tensor) -> Tensor:
    """Linearly interpolated quantiles of each column of an already sorted (n, k) tensor."""
    n = sorted_vals.shape[0]
    pos = q * (n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac
