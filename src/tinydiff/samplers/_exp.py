r"""Shared plan-time maths of the exponential-integrator solvers (float64, CPU; never in a step).

For any Gaussian path :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon` with half log-SNR
:math:`\lambda = \log(\alpha/\sigma)`, the data-prediction probability-flow ODE has the exact
solution (Lu et al. 2022, eq. 9; nothing in it needs :math:`\alpha^2 + \sigma^2 = 1`)

.. math::
    x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s \int_0^{h} e^{-\tau} D(\lambda_s - \tau)\,d\tau,
    \qquad h = \lambda_s - \lambda_t,

which the multistep solvers approximate by integrating a polynomial in :math:`\lambda`
through past denoiser outputs exactly. Coefficients are written with alpha and sigma, which
stay finite at both ends: :math:`\sigma = 0` at t = 0 and :math:`\alpha = 0` at infinite
noise, where :math:`\lambda = \pm\infty`.

One helper per idea: :func:`first_order` (the exact first-order step), :func:`exp_moments`
(the moments of :math:`e^{-\tau}`), :func:`solve_vandermonde` (polynomial weights through the
nodes), :func:`step_orders` (the order ramp).
"""

from __future__ import annotations

import math

import torch

from tinydiff.process import PathValues
from tinydiff.samplers.base import LOWER_ORDER_FINAL_STEPS


def first_order_between(a_t: float, s_t: float, a_s: float, s_s: float) -> tuple[float, float]:
    r"""(coefficient of x_t, coefficient of D) of the exact first-order step from
    (alpha_t, sigma_t) to (alpha_s, sigma_s): :math:`\sigma_s/\sigma_t` and
    :math:`\alpha_s(1 - e^{-h}) = \alpha_s - \alpha_t\sigma_s/\sigma_t`, finite at both ends."""
    ratio = s_s / s_t
    return ratio, a_s - a_t * ratio


def first_order(v: PathValues, i: int) -> tuple[float, float]:
    """:func:`first_order_between` for the step i -> i + 1 of ``v``."""
    return first_order_between(
        float(v.alpha[i]), float(v.sigma[i]), float(v.alpha[i + 1]), float(v.sigma[i + 1])
    )


def finite_history(v: PathValues, i: int) -> int:
    """How many consecutive times ending at i (i, i - 1, ...) have finite lambda: the number
    of denoiser outputs a polynomial in lambda can go through at step i."""
    n = 0
    for j in range(i, -1, -1):
        if not math.isfinite(float(v.lam[j])):
            break
        n += 1
    return n


#: a multistep step is first order when its log-SNR step h_i is more than this many times
#: the previous one: the polynomial through past outputs would be extrapolated far beyond
#: the nodes (the last steps of ``leading`` / ``linspace``, h_i / h_{i-1} ~ 4.3, where
#: DPM-Solver++(3M) ended up to 4.7x farther from the flow than DDIM)
MAX_STEP_RATIO = 2.0
#: ... or when h_i itself is above this (in half log-SNR): a polynomial in lambda through
#: outputs that far apart does not follow the denoiser (``karras`` on the cosine schedule,
#: h ~ 2.3 near the data, where UniPC ended 1.7x farther from the flow than DDIM)
MAX_MULTISTEP_H = 1.5


def step_orders(
    v: PathValues,
    order: int,
    *,
    lower_order_final: bool = False,
    last_first_order: bool = True,
    long_steps_first_order: bool = True,
) -> list[int]:
    """The order of each step of a multistep solver of order ``order``.

    It ramps up as history becomes available (only outputs at finite lambda count, so a start
    at infinite noise restarts the ramp); with ``lower_order_final`` and fewer than
    :data:`LOWER_ORDER_FINAL_STEPS` steps, step i has order at most S - i; with
    ``last_first_order`` the last step is first order when it ends at sigma = 0 (h = inf: the
    only finite data-prediction step); a process with sigma(0) > 0 keeps the order there.
    With ``long_steps_first_order`` a step is first order where extrapolating the history
    does more harm than good: its log-SNR step is over :data:`MAX_STEP_RATIO` times the
    previous one or over :data:`MAX_MULTISTEP_H` (tests/test_no_divergence.py: with it no
    multistep solver is farther from the flow than DDIM on any spacing at NFE >= 20).
    """
    num_steps = v.t.numel() - 1
    last_first_order = last_first_order and math.isinf(float(v.lam[-1]))
    lam = v.lam.tolist()
    orders = []
    for i in range(num_steps):
        o = min(order, finite_history(v, i))
        if lower_order_final and num_steps < LOWER_ORDER_FINAL_STEPS:
            o = min(o, num_steps - i)
        if last_first_order and i == num_steps - 1:
            o = 1
        if long_steps_first_order and o > 1:
            h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            if h > MAX_MULTISTEP_H or h > MAX_STEP_RATIO * h_prev:
                o = 1
        orders.append(max(o, 1))
    return orders


def exp_moments(h: float, count: int) -> list[float]:
    r""":math:`N_m = h\int_0^1 e^{-hu}u^m\,du = h^{-m}\int_0^h e^{-\tau}\tau^m\,d\tau` for
    m < count (h > 0), accurately: a series for small h, the stable upward recursion
    :math:`N_m = -e^{-h} + (m/h)N_{m-1}` otherwise; for h = inf the unnormalised moments
    :math:`\int_0^\infty e^{-\tau}\tau^m d\tau = m!` are returned instead."""
    if math.isinf(h):
        return [float(math.factorial(m)) for m in range(count)]
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


def solve_vandermonde(nodes: list[float], rhs: list[float]) -> list[float]:
    r"""Weights w with :math:`\sum_j w_j u_j^m = r_m` for m = 0..n-1 (n = len(nodes)): the
    quadrature weights of the polynomial through the nodes, given its moments r."""
    mat = torch.tensor([[u**m for u in nodes] for m in range(len(rhs))], dtype=torch.float64)
    return torch.linalg.solve(mat, torch.tensor(rhs, dtype=torch.float64)).tolist()


def exponential_adams_weights(v: PathValues, i: int, order: int) -> list[float]:
    r"""Weights w_j (j = 0..order-1, for D at times i, i - 1, ...) of the step i -> i + 1:
    :math:`\alpha_s\int_0^h e^{-\tau}P(\lambda_s-\tau)d\tau = \sum_j w_j D_{i-j}` for the
    polynomial P in lambda through those outputs (exponential Adams-Bashforth, the
    multistep DPM-Solver++ of Lu et al. 2022). Needs finite lambda at i+1-order..i+1."""
    if order == 1:
        return [first_order(v, i)[1]]
    lam_s = float(v.lam[i + 1])
    h = lam_s - float(v.lam[i])
    nodes = [(lam_s - float(v.lam[i - j])) / h for j in range(order)]  # u_j = tau_j / h
    w = solve_vandermonde(nodes, exp_moments(h, order))
    return [float(v.alpha[i + 1]) * x for x in w]
