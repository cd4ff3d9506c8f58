"""tinydiff.metrics.frechet_distance against the closed form of W2 between Gaussians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from tinydiff.metrics import fid, frechet_distance


def with_moments(n: int, mean: Tensor, cov: Tensor, seed: int) -> Tensor:
    """n points whose sample mean and (unbiased) sample covariance are exactly mean, cov."""
    z = torch.randn(
        n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    z = z - z.mean(0)
    w, v = torch.linalg.eigh(torch.cov(z.T))
    z = z @ (v * w.rsqrt()) @ v.T  # sample covariance I
    w, v = torch.linalg.eigh(cov)
    return mean + z @ ((v * w.sqrt()) @ v.T)


def test_commuting_covariances():
    """Same eigenvectors: d^2 = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    ea, eb = (
        torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64),
        torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64),
    )
    mu_a, mu_b = (
        torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    a = with_moments(500, mu_a, q @ torch.diag(ea) @ q.T, 1)
    b = with_moments(700, mu_b, q @ torch.diag(eb) @ q.T, 2)
    expected = 2.0 + float(((ea.sqrt() - eb.sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_2d_covariances():
    """In 2-d, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for SPD M, with
    M = Sa^1/2 Sb Sa^1/2: tr M = tr(Sa Sb), det M = det Sa det Sb."""
    sa = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    sb = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=torch.float64)
    a = with_moments(300, torch.zeros(2, dtype=torch.float64), sa, 3)
    b = with_moments(400, torch.tensor([0.0, 2.0], dtype=torch.float64), sb, 4)
    cross = math.sqrt(float((sa @ sb).trace()) + 2 * math.sqrt(float(sa.det() * sb.det())))
    expected = 4.0 + float(sa.trace() + sb.trace()) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_identical_sets_and_errors():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    assert abs(frechet_distance(x, x)) < 1e-9
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(x, x[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(x, torch.full((3, 4), float("nan")))


def test_fid_in_a_linear_feature_space_is_the_closed_form():
    """With features f(x) = W x the feature sets are Gaussian with moments (W mu, W S W^T):
    fid equals the closed form of those moments (commuting case), whatever the batch size,
    and a module extractor is run in eval mode and restored."""
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )
    ea = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    eb = torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64)
    mu_a = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    a = with_moments(500, mu_a, q @ torch.diag(ea) @ q.T, 1)
    b = with_moments(700, torch.zeros(3, dtype=torch.float64), q @ torch.diag(eb) @ q.T, 2)
    # images (n, 1, 3) whose feature map undoes q: features are then diagonal-covariance
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3, bias=False))
    extractor = extractor.double()
    with torch.no_grad():
        extractor[1].weight.copy_(q.T)
    extractor.train()
    expected = 2.0 + float(((ea.sqrt() - eb.sqrt()) ** 2).sum())  # |q^T mu_a|^2 = 2
    for bs in (7, 256, 10_000):
        got = fid(a[:, None], b[:, None], extractor, batch_size=bs)
        assert got == pytest.approx(expected, rel=1e-9)
    assert extractor.training
    with pytest.raises(ValueError, match="batch_size"):
        fid(a, b, extractor, batch_size=0)
    with pytest.raises(ValueError, match="callable"):
        fid(a, b, "inception")  # type: ignore[arg-type]
