"""Targets, variances and losses against their mathematical definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tinydiff import losses, targets, variances
from tinydiff.process import Point
from tinydiff.variances import VlbTerms, gaussian_kl, gaussian_posterior, posterior_coefficients

pytestmark = pytest.mark.usefixtures("_double")


@pytest.fixture
def _double():
    """float64 by default: this module checks identities to 1e-9 and tighter."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def vp_point(ab: torch.Tensor) -> Point:
    """The point of a variance-preserving process with alpha_bar ``ab``; derivatives in s of
    the cosine path alpha = cos(pi s / 2), sigma = sin(pi s / 2) through that point."""
    zero = torch.zeros_like(ab)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    k = torch.pi / 2
    return Point(zero, alpha, sigma, -k * sigma, k * alpha)


@pytest.mark.parametrize("vp", [True, False], ids=["vp", "any_path"])
@pytest.mark.parametrize("name", targets.names())
def test_target_round_trip(name: str, vp: bool) -> None:
    """to_x0_eps inverts target on x_t = alpha x0 + sigma eps, also off the VP circle."""
    target = targets.get(name)()
    x0, eps = torch.randn(64, 3), torch.randn(64, 3)
    ab = torch.rand(64, 1) * 0.98 + 0.01
    p = vp_point(ab)
    if not vp:  # rectified-flow-like and variance-exploding-like scales
        p = p._replace(alpha=torch.rand(64, 1) + 0.01, sigma=3 * torch.rand(64, 1) + 0.01)
        p = p._replace(d_alpha=-torch.rand(64, 1), d_sigma=torch.rand(64, 1) + 0.5)
    x_t = p.alpha * x0 + p.sigma * eps
    out = target.target(x0, eps, p)
    x0_hat, eps_hat = target.to_x0_eps(out, x_t, p)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", targets.names())
def test_x0_error_scale_is_the_jacobian_of_the_conversion(name: str) -> None:
    """||delta out||^2 = c(snr) ||delta x0||^2 for a perturbation of the network output."""
    target = targets.get(name)()
    if type(target).x0_error_scale is targets.Target.x0_error_scale:
        pytest.skip(f"{name} has no x0_error_scale (config refuses min_snr_gamma with it)")
    ab = torch.tensor([[0.05], [0.5], [0.95]])
    x_t, out = torch.randn(3, 4), torch.randn(3, 4)
    delta = 1e-3 * torch.randn(3, 4)
    x0_a, _ = target.to_x0_eps(out, x_t, vp_point(ab))
    x0_b, _ = target.to_x0_eps(out + delta, x_t, vp_point(ab))
    ratio = (delta**2).sum(1) / ((x0_b - x0_a) ** 2).sum(1)
    snr = (ab / (1 - ab)).squeeze(1)
    torch.testing.assert_close(ratio, target.x0_error_scale(snr), rtol=1e-9, atol=0)


def test_pred_v_is_finite_at_zero_snr() -> None:
    target = targets.get("pred_v")()
    x0, eps = torch.randn(5, 2), torch.randn(5, 2)
    p = vp_point(torch.zeros(5, 1))
    x0_hat, eps_hat = target.to_x0_eps(target.target(x0, eps, p), eps, p)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_posterior_coefficients_match_gaussian_conditioning() -> None:
    """q(x_s | x_t, x0) from the joint Gaussian of (x_s, x_t) given x0."""
    ab_s = torch.tensor([0.99, 0.7, 0.2, 1.0])
    ab_t = torch.tensor([0.95, 0.3, 0.0, 0.9])
    coef_x0, coef_xt, beta, beta_tilde = posterior_coefficients(ab_t, ab_s)
    # x_s = sqrt(ab_s) x0 + sqrt(1-ab_s) e1; x_t = sqrt(ab_t/ab_s) x_s + sqrt(1 - ab_t/ab_s) e2
    var_s, var_t = 1 - ab_s, 1 - ab_t
    cov = (ab_t / ab_s).sqrt() * var_s
    gain = cov / var_t
    torch.testing.assert_close(coef_xt, gain)
    torch.testing.assert_close(coef_x0, ab_s.sqrt() - gain * ab_t.sqrt())
    torch.testing.assert_close(beta_tilde, var_s - cov**2 / var_t)
    torch.testing.assert_close(beta, 1 - ab_t / ab_s)
    assert torch.isfinite(torch.stack([coef_x0, coef_xt, beta, beta_tilde])).all()


def test_gaussian_posterior_matches_conditioning_on_any_path() -> None:
    """q(x_s | x_t, x0) of a non-VP path (alpha^2 + sigma^2 != 1) from the joint Gaussian."""
    a_s, s_s = torch.tensor([0.9, 1.0, 0.5]), torch.tensor([0.3, 2.0, 0.5])
    a_t, s_t = torch.tensor([0.6, 1.0, 0.0]), torch.tensor([1.1, 5.0, 1.0])
    coef_x0, coef_xt, beta, beta_tilde = gaussian_posterior(a_t, s_t, a_s, s_s)
    # x_t = (a_t / a_s) x_s + sqrt(beta) e2 with beta = s_t^2 - (a_t / a_s)^2 s_s^2
    ratio = a_t / a_s
    cov = ratio * s_s**2  # Cov(x_s, x_t | x0)
    gain = cov / s_t**2
    torch.testing.assert_close(beta, s_t**2 - ratio**2 * s_s**2)
    torch.testing.assert_close(coef_xt, gain)
    torch.testing.assert_close(coef_x0, a_s - gain * a_t)
    torch.testing.assert_close(beta_tilde, s_s**2 - cov**2 / s_t**2)


def test_gaussian_kl_matches_torch_distributions() -> None:
    m1, m2 = torch.randn(10), torch.randn(10)
    lv1, lv2 = torch.randn(10), torch.randn(10)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), ref)


def test_variance_types_interpolate_between_the_bounds() -> None:
    log_beta, log_bt = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert variances.get("upper_bound")().log_variance(log_beta, log_bt, None) == -1.0
    assert variances.get("lower_bound")().log_variance(log_beta, log_bt, None) == -3.0
    lr = variances.get("learned_range")()
    v = torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(
        lr.log_variance(log_beta, log_bt, v), torch.tensor([-1.0, -3.0, -2.0])
    )
    with pytest.raises(ValueError, match="variance channels"):
        lr.log_variance(log_beta, log_bt, None)


def test_learned_range_vlb_term() -> None:
    """The hybrid term equals lambda * T * KL / ln 2 for t > 1 and the Gaussian NLL at t = 1."""
    lr = variances.get("learned_range")(vlb_weight=0.001)
    x0, x_t, x0_hat = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    var_out = torch.randn(2, 3)
    c0, ct = torch.tensor([[0.3], [1.0]]), torch.tensor([[0.6], [0.0]])
    lb, lbt = torch.tensor([[-2.0], [-4.0]]), torch.tensor([[-2.5], [-4.5]])
    terms = VlbTerms(x0, x_t, x0_hat, var_out, c0, ct, lb, lbt, torch.tensor([[0.0], [1.0]]), 1000)
    got = lr.extra_loss(terms)
    logvar = lr.log_variance(lb, lbt, var_out)
    mean_q, mean_p = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    kl = kl_divergence(
        Normal(mean_q[0], (0.5 * lbt[0]).exp()), Normal(mean_p[0], (0.5 * logvar[0]).exp())
    )
    nll = -Normal(mean_p[1], (0.5 * logvar[1]).exp()).log_prob(x0[1])
    torch.testing.assert_close(got[0], kl / math.log(2))
    torch.testing.assert_close(got[1], nll / math.log(2))


@pytest.mark.parametrize("name", losses.names())
def test_losses_are_elementwise_and_zero_at_target(name: str) -> None:
    fn = losses.get(name)
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    out = fn(pred, target)
    assert out.shape == pred.shape and (out >= 0).all()
    assert fn(target, target).abs().max() == 0


def test_builtin_loss_values() -> None:
    d = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0])
    z = torch.zeros(5)
    torch.testing.assert_close(losses.get("l2")(d, z), d**2)
    torch.testing.assert_close(losses.get("l1")(d, z), d.abs())
    expected = torch.where(d.abs() <= 1.0, 0.5 * d**2, d.abs() - 0.5)
    torch.testing.assert_close(losses.get("huber")(d, z), expected)
    torch.testing.assert_close(
        losses.get("huber")(d, z, delta=2.0),
        torch.where(d.abs() <= 2.0, 0.5 * d**2, 2.0 * (d.abs() - 1.0)),
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pred_eps", lambda snr, g: torch.minimum(snr, torch.tensor(g)) / snr),
        ("pred_x_0", lambda snr, g: torch.minimum(snr, torch.tensor(g))),
        ("pred_v", lambda snr, g: torch.minimum(snr, torch.tensor(g)) / (snr + 1)),
    ],
)
def test_min_snr_weights_match_hang_et_al(name: str, expected) -> None:
    snr = torch.tensor([0.01, 1.0, 4.9, 5.0, 100.0])
    w = losses.min_snr_weight(snr, 5.0, targets.get(name)().x0_error_scale(snr))
    torch.testing.assert_close(w, expected(snr, 5.0))


def test_min_snr_weight_at_zero_snr_is_finite() -> None:
    snr = torch.tensor([0.0])
    for name in targets.names():
        if targets.get(name).x0_error_scale is targets.Target.x0_error_scale:
            continue  # no min-SNR weighting for it (refused in the config)
        w = losses.min_snr_weight(snr, 5.0, targets.get(name)().x0_error_scale(snr))
        assert torch.isfinite(w).all()
