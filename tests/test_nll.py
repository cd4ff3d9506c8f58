r"""Variational bound vs the exact NLL of Gaussian mixtures, with the exact denoiser.

Why the checks are sound: for any model, E_data[bound(x)] >= E_data[-log p_model(x)] >=
E_data[-log p_data(x)] (cross-entropy >= entropy), so averaged over data samples the bound
can only be below the mixture's true NLL by Monte Carlo error. With the exact posterior mean
and the beta (upper_bound) reverse variance, the Gaussian reverse steps become exact as the
steps shrink, so the bound decreases towards the true NLL as the number of steps grows.
The same x samples are used at every step count, and differences are paired.
"""

from __future__ import annotations

import math

import pytest
import torch
from _models import exact_model
from torch import Tensor, nn

from tinydiff import DiffusionModel
from tinydiff.likelihood import discretized_gaussian_log_likelihood, vlb_terms
from tinydiff.testing import GaussianMixture

LN2 = math.log(2.0)


class _IntegerTimeExact(nn.Module):
    """The exact eps-prediction at integer times (a table lookup instead of ExactDenoiser's
    interpolation, which is slow for thousands of calls); checked against ExactDenoiser."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.mixture = mixture
        self.register_buffer("ab", alphas_cumprod.clone())

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        ab = self.ab[t.round().long()]
        x0 = self.mixture.posterior_mean(x_t, ab)
        ab = ab.view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def _setup(mixture: GaussianMixture, shape: tuple[int, ...], fast: bool = True) -> DiffusionModel:
    model = exact_model(
        mixture,
        input_shape=shape,
        num_timesteps=1000,
        sigma_type="upper_bound",
        target_type="pred_eps",
    )
    if fast:
        model.nn_module = _IntegerTimeExact(mixture, model.alphas_cumprod)
    return model


def test_fast_oracle_matches_exact_denoiser() -> None:
    mixture = GaussianMixture([[-0.5], [0.6]], [0.15, 0.25])
    x = torch.randn(50, 1, dtype=torch.float64)
    t = torch.randint(1, 1001, (50,)).double()
    slow, fast = _setup(mixture, (1,), fast=False), _setup(mixture, (1,))
    assert torch.allclose(slow.nn_module(x, t), fast.nn_module(x, t), atol=1e-10)


@pytest.mark.parametrize(
    ("means", "stds"),
    [([[-0.5], [0.6]], [0.15, 0.25]), ([[-0.6, 0.2], [0.5, -0.3]], [0.2, 0.3])],
)
def test_bound_decreases_to_true_nll(means: list[list[float]], stds: list[float]) -> None:
    mixture = GaussianMixture(means, stds, [0.4, 0.6])
    dim = len(means[0])
    model = _setup(mixture, (dim,))
    n = 4000
    x = mixture.sample(n, generator=torch.Generator().manual_seed(0))
    true = -mixture.log_prob(x) / (dim * LN2)
    bounds = {
        k: model.nll(
            x, timesteps=k, decoder="continuous", generator=torch.Generator().manual_seed(k)
        )
        for k in (5, 15, 50, 1000)
    }
    # never below the true NLL beyond Monte Carlo error
    for bound in bounds.values():
        gap = bound - true
        se = gap.std().item() / math.sqrt(n)
        assert gap.mean().item() > -3 * se
    # decreasing with the number of steps, significantly (paired differences)
    for coarse, fine in ((5, 15), (15, 50)):
        diff = bounds[coarse] - bounds[fine]
        se = diff.std().item() / math.sqrt(n)
        assert diff.mean().item() > 3 * se, (coarse, fine, diff.mean().item(), se)
    # and close to the true NLL with all 1000 steps (no test of decrease there: the
    # remaining gap is below the Monte Carlo resolution of a fast test)
    assert (bounds[1000] - true).mean().item() < 0.08


def test_terms_structure_and_prior() -> None:
    mixture = GaussianMixture([[0.0]], [0.5])
    model = _setup(mixture, (1,))
    x = torch.tensor([[0.3], [-0.2]], dtype=torch.float64)
    terms = vlb_terms(model, x, timesteps=[1, 500, 1000], decoder="continuous")
    assert terms["kl"].shape == (2, 2) and terms["times"].tolist() == [1, 500, 1000]
    ab = model.alphas_cumprod[1000]
    var = 1 - ab
    expected = 0.5 * (var + ab * x[:, 0] ** 2 - 1 - torch.log(var))
    assert torch.allclose(terms["prior"], expected)
    assert (terms["kl"] >= 0).all()


def test_discrete_decoder_is_a_distribution() -> None:
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_var in ((0.1, -3.0), (-0.97, -8.0), (0.999, 1.0)):
        logp = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_var)
        )
        assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discrete_bound_nonnegative_and_range_check() -> None:
    mixture = GaussianMixture([[-0.5, 0.5], [0.5, -0.5]], [0.2, 0.2])
    model = _setup(mixture, (2,))
    x = mixture.sample(64, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1  # the 256 levels
    bpd = model.nll(x, timesteps=20)
    assert bpd.shape == (64,) and (bpd >= 0).all() and bpd.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.nll(x * 2, timesteps=5)
    with pytest.raises(ValueError, match="decoder"):
        model.nll(x, decoder="gaussian")
    with pytest.raises(ValueError, match="timesteps"):
        model.nll(x, timesteps=[0, 5])
