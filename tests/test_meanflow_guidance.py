r"""MeanFlow with classifier-free guidance folded into training (Geng et al. 2025, sec. 4.2),
against the closed-form average velocity of the guided ODE.

Data: a condition y ~ N(0, tau^2 I) and x0 | y ~ N(m + y, s0^2 I), so that the conditional
and the unconditional distributions, N(m + y, s0^2 I) and N(m, s1^2 I) with
s1^2 = s0^2 + tau^2, are both Gaussian. On rectified flow (x_s = (1 - s) x0 + s eps) a
Gaussian N(mu, sd^2 I) has the marginal standard deviation S(s) = sqrt((1 - s)^2 sd^2 + s^2)
and the velocity v(x, s) = k(s) x - mu s / S^2 with k = S'/S = (s - (1 - s) sd^2) / S^2.
The guided velocity v_g = omega v_c + (1 - omega) v_u = A(s) x + B(s) is affine in x, with
A = (log G)' for G = S_c^omega S_u^(1 - omega), so its flow from s_t to s_r is
x_r = G(s_r) (x_t / G(s_t) - int_{s_r}^{s_t} B / G), and the average velocity
u = (x_t - x_r) / (s_t - s_r) is

    u = x_t * mean_[s_r, s_t](A G) / G(s_t) + G(s_r) * mean_[s_r, s_t](B / G),

(using 1 - G(s_r)/G(s_t) = int A G / G(s_t)): two interval means, computed by 24-point
Gauss-Legendre quadrature (the integrands are analytic on [0, 1]; error far below 1e-12),
with no 0/0 at r = t, where u = v_g.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import tinydiff
from tinydiff import DiffusionModel, objectives
from tinydiff.nn import MLP

T = 1000
M = torch.tensor([0.7, -0.4], dtype=torch.float64)
S0, TAU = 0.5, 0.8
S1 = math.sqrt(S0**2 + TAU**2)
RF = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}
_NODES, _WEIGHTS = (
    torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(24)
)


def guided_average_velocity(
    x: Tensor, s_t: Tensor, s_r: Tensor, mu_c: Tensor, omega: float, sd_c: float = S0
) -> Tensor:
    """The average velocity over [s_r, s_t] of omega v(. | N(mu_c, sd_c^2)) + (1 - omega)
    v(. | N(M, S1^2)) on rectified flow: x (n, 2), s_t and s_r (n, 1), mu_c (n, 2) or (2,)."""
    tau = s_r[..., None] + (s_t - s_r)[..., None] * (1 + _NODES) / 2  # (n, 1, 24)
    mean = (_WEIGHTS / 2).view(1, 1, -1)  # the quadrature of an interval mean

    def sd2(s: Tensor, sd: float) -> Tensor:
        return (1 - s) ** 2 * sd**2 + s**2

    def k(s: Tensor, sd: float) -> Tensor:
        return (s - (1 - s) * sd**2) / sd2(s, sd)

    def log_g(s: Tensor) -> Tensor:
        return omega / 2 * sd2(s, sd_c).log() + (1 - omega) / 2 * sd2(s, S1).log()

    a = omega * k(tau, sd_c) + (1 - omega) * k(tau, S1)  # (n, 1, 24)
    mu_c = mu_c.expand(x.shape)[..., None]  # (n, 2, 1)
    b = -(omega * mu_c * tau / sd2(tau, sd_c) + (1 - omega) * M.view(1, 2, 1) * tau / sd2(tau, S1))
    g_tau = log_g(tau).exp()
    slope = (mean * a * g_tau).sum(-1) / log_g(s_t).exp()  # (n, 1)
    shift = log_g(s_r).exp() * (mean * b / g_tau).sum(-1)  # (n, 2)
    return x * slope + shift


class GuidedExact(nn.Module):
    """u of the omega-guided ODE for the condition cond["y"] = (y, 1), the unconditional u
    for the null condition (y, 0) -> (0, 0, 0); plus ``delta`` on the conditional output and
    three zero parameters b, a, c (their gradients: the objective's expected gradient
    against the functions 1, x_t and y)."""

    end_time = True

    def __init__(self, omega: float, delta: float = 0.0) -> None:
        super().__init__()
        self.omega, self.delta = omega, delta
        self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.c = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def null_cond(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"y": torch.zeros_like(cond["y"])}

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, y: Any = None) -> Tensor:
        r = t if r is None else r
        s_t, s_r = (t.to(torch.float64) / T)[:, None], (r.to(torch.float64) / T)[:, None]
        y = torch.zeros(x.shape[0], 3, dtype=x.dtype) if y is None else y
        cond = guided_average_velocity(x, s_t, s_r, M + y[:, :2], self.omega) + self.delta
        null = guided_average_velocity(x, s_t, s_r, M, 1.0, sd_c=S1)
        u = torch.where(y[:, 2:] > 0, cond, null)
        return u + self.b + self.a * x + self.c * y[:, :2]


def guided_model(net: nn.Module, **kwargs: Any) -> DiffusionModel:
    return DiffusionModel(
        net,
        input_shape=(2,),
        **RF,
        cond_drop_prob=0.2,
        training_objective="meanflow",
        training_objective_kwargs={"adaptive_p": 0.0, "flow_map_fraction": 0.5, **kwargs},
    ).double()


def conditional_data(n: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = TAU * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = M + y + S0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, {"y": torch.cat([y, torch.ones(n, 1, dtype=torch.float64)], 1)}


# -- the oracle ------------------------------------------------------------------------------------
def test_oracle_is_the_displacement_of_the_guided_ode():
    """(x_t - x_r) / (s_t - s_r) along the guided ODE (RK4 on the oracle's u at r = t, the
    guided velocity), and at omega = 1 the single-Gaussian closed form of test_meanflow."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 2, generator=g, dtype=torch.float64)
    mu = M + torch.randn(5, 2, generator=g, dtype=torch.float64)
    omega, s_t, s_r = 2.5, 0.9, 0.05

    def velocity(z: Tensor, s: float) -> Tensor:
        col = torch.full((5, 1), s, dtype=torch.float64)
        return guided_average_velocity(z, col, col, mu, omega)

    x, n = x_t.clone(), 400
    h = (s_r - s_t) / n
    for i in range(n):
        s = s_t + i * h
        k1 = velocity(x, s)
        k2 = velocity(x + h / 2 * k1, s + h / 2)
        k3 = velocity(x + h / 2 * k2, s + h / 2)
        k4 = velocity(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    col_t, col_r = (torch.full((5, 1), s, dtype=torch.float64) for s in (s_t, s_r))
    u = guided_average_velocity(x_t, col_t, col_r, mu, omega)
    torch.testing.assert_close(u, (x_t - x) / (s_t - s_r), rtol=0, atol=1e-10)
    # omega = 1: u = -mu + (a (s_t + s_r) + b) / (S_t + S_r) (x_t - mu_t) / S_t
    a, b = S0**2 + 1, -2 * S0**2
    sd_t, sd_r = (math.sqrt((1 - s) ** 2 * S0**2 + s**2) for s in (s_t, s_r))
    closed = -mu + (a * (s_t + s_r) + b) / (sd_t + sd_r) * (x_t - (1 - s_t) * mu) / sd_t
    torch.testing.assert_close(guided_average_velocity(x_t, col_t, col_r, mu, 1.0), closed)


# -- the objective ---------------------------------------------------------------------------------
def _gradient_estimates(model: DiffusionModel, chunks: int = 8) -> Tensor:
    """The objective's gradient in (b, a, c) on ``chunks`` independent batches of 4000,
    (chunks, 4): their mean estimates the expected gradient, their spread its standard
    error (one thread: about 2 s)."""
    out, g = [], torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(chunks):
            model.zero_grad()
            x, cond = conditional_data(4000, 100 + i)
            model.loss(x, cond=cond, generator=g).mean().backward()
            net = model.nn_module
            out.append(torch.cat([net.b.grad, net.a.grad.view(1), net.c.grad.view(1)]))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("omega", "kappa"),
    [(2.0, 0.0), (1.5, 0.25)],  # effective scale omega / (1 - kappa) = 2 in both
    ids=["omega", "omega_kappa"],
)
def test_expected_gradient_vanishes_at_the_guided_average_velocity_only(omega, kappa):
    """adaptive_p = 0: for kept conditions E[v~ | x_t, y] = v_g at the exact network (its
    null output is the unconditional velocity), and the target is linear in v~, so the
    minimiser is the guided ODE's average velocity; the unguided conditional one (omega 1)
    and a shifted one are not minimisers."""
    kwargs = {"guidance_scale": omega, "guidance_mix": kappa}
    effective = omega / (1 - kappa)
    exact = _gradient_estimates(guided_model(GuidedExact(effective), **kwargs))
    se = exact.std(0) / math.sqrt(exact.shape[0])
    assert (exact.mean(0).abs() < 4 * se).all(), (exact.mean(0), se)
    unguided = _gradient_estimates(guided_model(GuidedExact(1.0), **kwargs))
    assert unguided.mean(0)[3].abs() > 20 * se[3], (unguided.mean(0), se)  # against y
    if kappa == 0:
        shifted = _gradient_estimates(guided_model(GuidedExact(effective, delta=0.2), **kwargs))
        assert (shifted.mean(0)[:2].abs() > 8 * se[:2]).all(), (shifted.mean(0), se)


def _random_model(cond_drop_prob: float = 0.3, **kwargs: Any) -> DiffusionModel:
    torch.manual_seed(0)
    net = MLP(2, 32, 2, num_classes=3, end_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return DiffusionModel(
        net,
        input_shape=(2,),
        **RF,
        cond_drop_prob=cond_drop_prob,
        training_objective="meanflow",
        training_objective_kwargs=kwargs,
    ).double()


def _loss(model: DiffusionModel, **kwargs: Any) -> Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (64,), generator=g)
    return model.loss(x, cond={"class_labels": labels}, generator=g, **kwargs)


def test_scale_one_is_the_unguided_objective_bitwise():
    plain = _loss(_random_model())
    assert torch.equal(_loss(_random_model(guidance_scale=1.0)), plain)
    assert torch.equal(_loss(_random_model(guidance_scale=1.0, guidance_mix=0.0)), plain)
    assert not torch.equal(_loss(_random_model(guidance_scale=2.0)), plain)


def test_dropped_conditions_keep_the_plain_target():
    """With every condition dropped the guided objective is the plain one, bitwise; with
    none dropped it differs (and computes the null output without gradients)."""
    drop = torch.ones(64, dtype=torch.bool)
    plain = _loss(_random_model(), cond_drop_mask=drop)
    guided = _random_model(guidance_scale=3.0, guidance_mix=0.5)
    assert torch.equal(_loss(guided, cond_drop_mask=drop), plain)
    kept = _loss(guided, cond_drop_mask=~drop)
    assert not torch.equal(kept, _loss(_random_model(), cond_drop_mask=~drop))
    kept.mean().backward()  # the extra pass is out of the graph: backward runs once through u


def test_guidance_needs_dropout_a_condition_and_kappa_below_one():
    with pytest.raises(ValueError, match="needs the unconditional model.*cond_drop_prob > 0"):
        _random_model(cond_drop_prob=0.0, guidance_scale=2.0)
    _random_model(cond_drop_prob=0.0, guidance_scale=1.0)  # unguided: no dropout needed
    with pytest.raises(ValueError, match="guidance_mix.*< 1"):
        _random_model(guidance_scale=2.0, guidance_mix=1.0)
    with pytest.raises(ValueError, match="guidance_scale must be a number"):
        _random_model(guidance_scale="2")
    model = _random_model(guidance_scale=2.0)
    with pytest.raises(ValueError, match="guided conditional model: pass the condition"):
        model.loss(torch.randn(4, 2, dtype=torch.float64))
    assert model.config.training_objective_kwargs["guidance_scale"] == 2.0  # saved with it


def test_sampling_time_guidance_points_to_the_training_option():
    model = _random_model(guidance_scale=2.0)
    labels = torch.tensor([0, 1])
    out = model.sample(2, 1, cond={"class_labels": labels})  # the guided model: cond only
    assert out.shape == (2, 2)
    with pytest.raises(
        ValueError, match="not the flow map.*Fold guidance into training.*'guidance_scale'"
    ):
        model.sample(2, 1, cond={"class_labels": labels}, guidance_scale=2.0)


def test_objective_reports_its_effective_scale():
    objective = objectives.MeanFlow(guidance_scale=1.5, guidance_mix=0.25)
    assert objective.guided and objective.effective_guidance_scale == 2.0
    assert not objectives.MeanFlow().guided
    assert isinstance(tinydiff.objectives.build("meanflow", {}), objectives.MeanFlow)
