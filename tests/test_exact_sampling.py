"""Samplers against the exact Gaussian-mixture denoiser, and tinydiff.testing itself."""

from __future__ import annotations

import math

import pytest
import torch
from _models import exact_model
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from tinydiff.testing import GaussianMixture

MIX = GaussianMixture(
    means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], stds=[0.3, 0.5, 0.2], weights=[0.5, 0.3, 0.2]
)


# -- tinydiff.testing ------------------------------------------------------------------------
def test_mixture_log_prob_matches_torch_distributions() -> None:
    ref = MixtureSameFamily(
        Categorical(MIX.weights),
        Independent(Normal(MIX.means, MIX.stds), 1),
    )
    x = torch.randn(100, 2, dtype=torch.float64) * 2
    torch.testing.assert_close(MIX.log_prob(x), ref.log_prob(x))


def test_mixture_sample_moments() -> None:
    x, comp = MIX.sample(40_000, torch.Generator().manual_seed(0), return_components=True)
    counts = torch.bincount(comp, minlength=3).double() / 40_000
    assert (counts - MIX.weights).abs().max() < 5 * math.sqrt(0.25 / 40_000)
    assert (x.mean(0) - MIX.mean()).abs().max() < 5 * math.sqrt(
        MIX.covariance().diag().max() / 40_000
    )


def test_posterior_mean_single_gaussian_closed_form() -> None:
    """For N(mu, s^2 I): E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + 1 - a^2) (x_t - a mu)."""
    g = GaussianMixture([[1.0, -1.0]], [0.7])
    x_t = torch.randn(10, 2, dtype=torch.float64)
    for ab in (0.0, 0.3, 0.999):
        a = math.sqrt(ab)
        expected = torch.tensor([1.0, -1.0]) + a * 0.49 / (a * a * 0.49 + 1 - ab) * (
            x_t - a * torch.tensor([1.0, -1.0])
        )
        torch.testing.assert_close(g.posterior_mean(x_t, ab), expected.double())


def test_posterior_mean_is_the_conditional_expectation_monte_carlo() -> None:
    """E[x0 | x_t] minimises the squared error: it beats perturbed versions on fresh data, and
    the residual x0 - E[x0|x_t] is uncorrelated with x_t (orthogonality of the projection)."""
    gen = torch.Generator().manual_seed(3)
    x0 = MIX.sample(200_000, gen)
    ab = 0.4
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(
        x0.shape, generator=gen, dtype=torch.float64
    )
    resid = x0 - MIX.posterior_mean(x_t, ab)
    assert resid.mean(0).abs().max() < 0.01
    corr = (resid[:, :, None] * x_t[:, None, :]).mean(0)
    assert corr.abs().max() < 0.01


@pytest.mark.parametrize("target_type", ["pred_eps", "pred_x_0", "pred_v"])
def test_exact_denoiser_outputs_the_configured_target(target_type: str) -> None:
    model = exact_model(
        MIX, dtype=torch.float32, target_type=target_type, noise_schedule_type="linear"
    )
    x_t, t = torch.randn(6, 2, dtype=torch.float64), torch.tensor([1.0, 10, 250.5, 500, 900, 1000])
    out = model.nn_module.double()(x_t, t)
    ab = model.alpha_bar(t)[:, None]
    x0 = MIX.posterior_mean(x_t, ab.squeeze(1))
    eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    expected = {"pred_eps": eps, "pred_x_0": x0, "pred_v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
    torch.testing.assert_close(out, expected[target_type])


def test_exact_denoiser_learned_range_returns_lower_bound_channels() -> None:
    model = exact_model(MIX, dtype=torch.float32, sigma_type="learned_range")
    out = model.nn_module(torch.randn(3, 2), torch.full((3,), 10.0))
    assert out.shape == (3, 4) and (out[:, 2:] == -1).all()


# -- samplers at full T reproduce the data distribution ----------------------------------------
N = 4000


def check_moments(x: torch.Tensor) -> None:
    """Mean within 5 standard errors; covariance entries within 6 standard errors (the
    fourth moments of the mixture give the standard errors); mode weights within 5 binomial
    standard errors."""
    x = x.double()
    cov = MIX.covariance()
    se_mean = (cov.diag() / N).sqrt()
    assert ((x.mean(0) - MIX.mean()).abs() < 5 * se_mean).all(), (x.mean(0), MIX.mean())
    ref = MIX.sample(200_000, torch.Generator().manual_seed(9))
    centred = ref - ref.mean(0)
    prods = centred[:, :, None] * centred[:, None, :]
    se_cov = prods.std(0) / math.sqrt(N)
    emp = torch.cov(x.T)
    assert ((emp - cov).abs() < 6 * se_cov).all(), (emp, cov)
    weights = MIX.responsibilities(x).mean(0)
    assert ((weights - MIX.weights).abs() < 5 * (MIX.weights * (1 - MIX.weights) / N).sqrt()).all()


@pytest.mark.parametrize(
    "sampler, sampler_kwargs, sigma_type",
    [
        ("ddpm", {}, "upper_bound"),
        ("ddpm", {}, "lower_bound"),
        ("ddim", {"eta": 0.0}, "upper_bound"),
        ("ddim", {"eta": 1.0}, "upper_bound"),
    ],
)
def test_full_T_sampling_reproduces_the_mixture(sampler, sampler_kwargs, sigma_type) -> None:
    model = exact_model(
        MIX, dtype=torch.float32, noise_schedule_type="linear", sigma_type=sigma_type
    )
    gen = torch.Generator().manual_seed(0)
    x = model.sample(N, None, sampler=sampler, sampler_kwargs=sampler_kwargs, generator=gen)
    check_moments(x)


@pytest.mark.parametrize("target_type", ["pred_x_0", "pred_v"])
def test_respaced_ddpm_with_zero_terminal_snr_reproduces_the_mixture(target_type: str) -> None:
    model = exact_model(
        MIX,
        dtype=torch.float32,
        noise_schedule_type="cosine",
        zero_terminal_snr=True,
        target_type=target_type,
        sigma_type="lower_bound",
    )
    x = model.sample(N, 250, generator=torch.Generator().manual_seed(1))
    check_moments(x)


@pytest.mark.parametrize("steps", [7, 50, 250])
def test_ddim_eta_one_is_ddpm_with_the_posterior_variance(steps: int) -> None:
    """Song et al. 2021: DDIM with eta = 1 is DDPM ancestral sampling with beta-tilde, step for
    step, so the same noise stream gives the same samples."""
    model = exact_model(
        MIX, dtype=torch.float32, noise_schedule_type="cosine", sigma_type="lower_bound"
    )
    model.nn_module.double()
    ddpm = model.sample(64, steps, sampler="ddpm", generator=torch.Generator().manual_seed(5))
    ddim = model.sample(
        64,
        steps,
        sampler="ddim",
        sampler_kwargs={"eta": 1.0},
        generator=torch.Generator().manual_seed(5),
    )
    assert ddpm.dtype == torch.float64
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)
    # and it differs from DDPM with the upper-bound variance
    up = exact_model(
        MIX, dtype=torch.float32, noise_schedule_type="cosine", sigma_type="upper_bound"
    )
    up.nn_module.double()
    ddpm_up = up.sample(64, steps, sampler="ddpm", generator=torch.Generator().manual_seed(5))
    assert (ddpm_up - ddpm).abs().max() > 1e-3
