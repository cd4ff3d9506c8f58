r"""Shared plan-time maths for the ODE/SDE solvers (float64, CPU; never used inside a step).

Variance-preserving notation (Lu et al. 2022): :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`
with :math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1-\bar\alpha}` and half
log-SNR :math:`\lambda = \log(\alpha/\sigma)`. Coefficients are written with VP quantities,
which stay finite at both ends: :math:`\sigma = 0` at t = 0 and :math:`\alpha = 0` under zero
terminal SNR, where :math:`\lambda = \pm\infty`.

The data-prediction probability-flow ODE has the exact solution (Lu et al. 2022, eq. 9)

.. math::
    x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s \int_0^{h} e^{-\tau} D(\lambda_s - \tau)\,d\tau,
    \qquad h = \lambda_s - \lambda_t,

which the multistep solvers approximate by integrating a polynomial in :math:`\lambda`
through past denoiser outputs exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class VP(NamedTuple):
    """Per-time VP quantities, float64 (S + 1,)."""

    alpha: Tensor
    sigma: Tensor
    lam: Tensor


def vp(alpha_bar: Tensor) -> VP:
    """alpha, sigma and lambda = log(alpha / sigma) (with +-inf at the ends) from alpha_bar."""
    ab = alpha_bar.to(torch.float64)
    alpha, sigma = ab.sqrt(), (1 - ab).clamp_min(0).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    return VP(alpha, sigma, lam)


def first_order(v: VP, i: int) -> tuple[float, float]:
    r"""(coefficient of x_t, coefficient of D) of the exact first-order step i -> i + 1:
    :math:`\sigma_s/\sigma_t` and :math:`\alpha_s(1 - e^{-h}) = \alpha_s - \alpha_t\sigma_s/\sigma_t`,
    finite at both ends."""
    a_t, a_s = float(v.alpha[i]), float(v.alpha[i + 1])
    s_t, s_s = float(v.sigma[i]), float(v.sigma[i + 1])
    ratio = s_s / s_t
    return ratio, a_s - a_t * ratio


def finite_history(v: VP, i: int) -> int:
    """How many consecutive times ending at i (i, i - 1, ...) have finite lambda: the number
    of denoiser outputs a polynomial in lambda can go through at step i."""
    n = 0
    for j in range(i, -1, -1):
        if not math.isfinite(float(v.lam[j])):
            break
        n += 1
    return n


def exp_moments(h: float, count: int) -> list[float]:
    r""":math:`N_m = h\int_0^1 e^{-hu}u^m\,du` for m < count (finite h > 0), accurately: a
    series for small h, the stable upward recursion :math:`N_m = -e^{-h} + (m/h)N_{m-1}`
    otherwise."""
    if h < 0.5:
        out = []
        for m in range(count):
            term, total, n = h, 0.0, 0
            while True:
                add = term / (m + n + 1)
                total += add
                n += 1
                term *= -h / n
                if abs(add) < 1e-18 * abs(total) or n > 60:
                    break
            out.append(total)
        return out
    out = [-math.expm1(-h)]
    for m in range(1, count):
        out.append(-math.exp(-h) + m / h * out[-1])
    return out


def exponential_adams_weights(v: VP, i: int, order: int) -> list[float]:
    r"""Weights w_j (j = 0..order-1, for D at times i, i - 1, ...) of the step i -> i + 1:
    :math:`\alpha_s\int_0^h e^{-\tau}P(\lambda_s-\tau)d\tau = \sum_j w_j D_{i-j}` for the
    polynomial P in lambda through those outputs (exponential Adams-Bashforth, the
    multistep DPM-Solver++ of Lu et al. 2022). Needs finite lambda at i+1-order..i+1."""
    if order == 1:
        return [first_order(v, i)[1]]
    lam_s = float(v.lam[i + 1])
    h = lam_s - float(v.lam[i])
    nodes = [(lam_s - float(v.lam[i - j])) / h for j in range(order)]  # u_j = tau_j / h
    moments = exp_moments(h, order)
    vander = torch.tensor([[u**m for u in nodes] for m in range(order)], dtype=torch.float64)
    w = torch.linalg.solve(vander, torch.tensor(moments, dtype=torch.float64))
    return [float(v.alpha[i + 1]) * float(x) for x in w]
