"""Sample-quality metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["energy_distance", "fid", "frechet_distance", "sliced_wasserstein"]


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


def energy_distance(a: Tensor, b: Tensor, scales: Tensor | None = None) -> float:
    r"""The energy distance between two samples (Székely & Rizzo 2013), as a V-statistic.

    .. math::
        \mathcal E(a, b) = \frac{2}{nm}\sum_{i,j}\lVert a_i - b_j\rVert
        - \frac{1}{n^2}\sum_{i,i'}\lVert a_i - a_{i'}\rVert
        - \frac{1}{m^2}\sum_{j,j'}\lVert b_j - b_{j'}\rVert,

    the plug-in estimate of :math:`2\,\mathbb E\lVert X - Y\rVert - \mathbb E\lVert X -
    X'\rVert - \mathbb E\lVert Y - Y'\rVert`, which is >= 0 and 0 only for equal distributions.
    The V-statistic (diagonal terms included) is >= 0 for any two samples and exactly 0 for
    identical ones; for i.i.d. samples it exceeds the population value by
    :math:`\mathbb E\lVert X - X'\rVert/n + \mathbb E\lVert Y - Y'\rVert/m` on average, so
    compare distances at equal sample sizes (e.g. against the distance between two
    independent draws from the target: the floor). Float64, on the CPU; O(n m) memory.

    Args:
        a: (n, *shape) samples.
        b: (m, *shape) samples of the same event shape.
        scales: optional per-coordinate scales, broadcastable against one sample (e.g. the
            target distribution's standard deviations, (*shape,)): the distance is computed on
            a / scales and b / scales, so that no coordinate dominates.

    Returns:
        The distance, a Python float (>= 0).

    Raises:
        ValueError: event shapes differ, an empty sample, or scales that are not positive and
            finite or do not broadcast against one sample.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"event shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise ValueError("energy_distance needs at least 1 point in each sample")
    x = a.detach().double().cpu()
    y = b.detach().double().cpu()
    if scales is not None:
        s = torch.as_tensor(scales).detach().double().cpu()
        try:
            shape = torch.broadcast_shapes(s.shape, x.shape[1:])
        except RuntimeError:
            shape = None
        if shape != x.shape[1:]:
            raise ValueError(
                f"scales of shape {tuple(s.shape)} must broadcast against one sample of shape "
                f"{tuple(x.shape[1:])}"
            )
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError("scales must be positive and finite")
        x, y = x / s, y / s
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    exact = "donot_use_mm_for_euclid_dist"  # the mm form loses digits for close points
    xy = torch.cdist(x, y, compute_mode=exact).mean()
    xx = torch.cdist(x, x, compute_mode=exact).mean()
    yy = torch.cdist(y, y, compute_mode=exact).mean()
    return max(float(2 * xy - xx - yy), 0.0)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    r"""The Frechet distance between Gaussians fitted to two feature sets (Dowson & Landau
    1982; FID when the features are Inception's, Heusel et al. 2017):

    $$
    d^2 = \lVert\mu_a - \mu_b\rVert^2 + \operatorname{tr}\big(\Sigma_a + \Sigma_b
    - 2\,(\Sigma_a^{1/2}\Sigma_b\Sigma_a^{1/2})^{1/2}\big),
    $$

    the squared 2-Wasserstein distance between $N(\mu_a, \Sigma_a)$ and $N(\mu_b, \Sigma_b)$,
    with the sample means and (unbiased) sample covariances. The matrix square roots are
    taken by symmetric eigendecompositions (eigenvalues clamped at 0), which stays real and
    stable for the singular covariances of few samples in many dimensions. Float64, on the
    CPU.

    Args:
        feats_a: (n, d) features (any trailing shape is flattened), n >= 2.
        feats_b: (m, d) features of the same dimension, m >= 2.

    Returns:
        The squared distance $d^2$, a Python float (>= 0 up to rounding).

    Raises:
        ValueError: fewer than 2 rows, different feature dimensions, or non-finite values.
    """
    if not isinstance(feats_a, Tensor) or not isinstance(feats_b, Tensor):
        raise ValueError("frechet_distance takes two tensors of features (n, d) and (m, d)")
    a = feats_a.detach().reshape(feats_a.shape[0], -1).double().cpu()
    b = feats_b.detach().reshape(feats_b.shape[0], -1).double().cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 feature vectors in each set")
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("frechet_distance: the features hold NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root_a @ s_b @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross
    return float(d2)


def fid(
    samples: Tensor,
    reference: Tensor,
    features: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 256,
) -> float:
    """The Frechet distance between two image sets in the space of a feature extractor:
    `frechet_distance(features(samples), features(reference))`, the features computed in
    batches under `torch.no_grad()` (FID when `features` is Inception-v3's pool layer,
    Heusel et al. 2017).

    tinydiff downloads nothing: pass a network you load from a local file, e.g.
    torchmetrics' or torch-fidelity's Inception with local weights, a DINOv2 backbone (FD-DINOv2,
    Stein et al. 2023), or a small classifier trained on your data (what
    `benchmarks/defaults.py` does on scikit-learn's digits). Distances are comparable only
    between runs with the same extractor, preprocessing and set sizes.

    Args:
        samples: (n, ...) generated images, n >= 2, in whatever range `features` expects.
        reference: (m, ...) real images, m >= 2.
        features: `(b, ...) -> (b, d)` (or any trailing shape, flattened); called in eval
            mode if it is an `nn.Module` (its mode is restored), on batches of `batch_size`.
        batch_size: rows per call of `features`, >= 1.

    Returns:
        The squared Frechet distance, a Python float.

    Raises:
        ValueError: a bad batch size, fewer than 2 rows, features of different dimensions
            or non-finite features.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not callable(features):
        raise ValueError(f"features must be a callable (b, ...) -> (b, d), got {features!r}")
    module = features if isinstance(features, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            feats = [
                torch.cat([features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
                for x in (samples, reference)
            ]
    finally:
        if module is not None:
            module.train(was_training)
    return frechet_distance(feats[0], feats[1])


def _quantiles(sorted_vals: Tensor, q: Tensor) -> Tensor:
    """Linearly interpolated quantiles of each column of an already sorted (n, k) tensor."""
    n = sorted_vals.shape[0]
    pos = q * (n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac
