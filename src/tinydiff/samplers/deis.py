r"""DEIS: diffusion exponential integrator sampler, tAB in log-SNR (Zhang & Chen 2022,
"Fast Sampling of Diffusion Models with Exponential Integrator", the multistep "tAB-DEIS"
with the noise prediction interpolated in :math:`\lambda` ("logrho"))."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import exp_moments, solve_vandermonde, step_orders
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register


def _eps_adams_weights(lam: list[float], order: int) -> list[float]:
    r"""Weights w_j (for eps at lam[1], lam[2], ...) of
    :math:`\int_0^{h} e^{-\tau} P(\lambda_c + \tau)\,d\tau = \sum_j w_j \epsilon_{c-j}`, P the
    polynomial in lambda through the ``order`` past noise predictions.

    ``lam`` = [lambda_n (target, may be +inf), lambda_c, lambda_{c-1}, ...]. The moments
    :math:`M_m = \int_0^h e^{-\tau}\tau^m d\tau` are finite for h = inf (m!), so unlike the
    data-prediction form this step keeps its order on the last step to t = 0."""
    h = lam[0] - lam[1]
    nodes = [lam[1 + j] - lam[1] for j in range(order)]  # tau_j <= 0
    moments = exp_moments(h, order)  # N_m = h^-m M_m (finite h); M_m = m! (h = inf)
    if not math.isinf(h):
        moments = [h**m * n_m for m, n_m in enumerate(moments)]
    scale = max(abs(nodes[-1]), 1.0)  # condition the Vandermonde system: tau / scale
    return solve_vandermonde(
        [u / scale for u in nodes], [mo / scale**m for m, mo in enumerate(moments)]
    )


@register("deis", aliases=("deis_tab", "tab_deis"))
class DEIS(Sampler):
    r"""Multistep exponential integrator of the noise-prediction probability-flow ODE.

    With :math:`\rho = \sigma/\alpha = e^{-\lambda}` the flow is
    :math:`d(x/\alpha) = \hat\epsilon\,d\rho`, so step i is exactly
    :math:`x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i - \alpha_{i+1}e^{-\lambda_i}
    \int_0^{h_i} e^{-\tau}\hat\epsilon(\lambda_i+\tau)\,d\tau` with :math:`\hat\epsilon`
    replaced by the polynomial in :math:`\lambda` through
    :math:`\hat\epsilon_i, \hat\epsilon_{i-1}, \dots` (tAB-DEIS, Zhang & Chen 2022, sec. 4,
    with DPM-Solver's log-SNR variable, Lu et al. 2022), integrated exactly at plan time.

    The moments of :math:`e^{-\tau}` stay finite for :math:`h = \infty`, so the last step to
    t = 0 keeps the full order (the data-prediction solvers must take it at first order,
    :math:`x_S = D_{S-1}`). Order ramps up over the first steps; a start at infinite noise
    (zero terminal SNR, :math:`\alpha_0 = 0`) takes the finite first-order form
    :math:`x_1 = \alpha_1 D_0 + \sigma_1\hat\epsilon_0` (DDIM).

    Args:
        order: 1, 2 (default) or 3; 1 is DDIM. Order 2 measured best at few steps
            (``benchmarks/sampler_quality.py``).
        lower_order_final: with fewer than 15 steps, cap the order of step i at S - i
            (off by default: the last long step is where the order pays, see above).

    State: ``order - 1`` past noise predictions. NFE: one per step, ``nfe(S) = S``.
    """

    #: geometric mean over benchmarks/sampler_quality.py's quick grid (VP and rectified flow)
    #: of error / best spacing's: 1.43
    default_spacing = "trailing"

    def __init__(self, order: int = 2, lower_order_final: bool = False) -> None:
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"deis order must be 1, 2 or 3, got {order!r}")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
        self.order = order
        self.lower_order_final = lower_order_final

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        lam = path.lam.tolist()
        # DEIS keeps its order on long steps: measured on benchmarks/sampler_quality.py's
        # grid, first-order long steps made it up to 5x worse on ``leading``, and without
        # them it is within DDIM's error everywhere (tests/test_no_divergence.py)
        orders = step_orders(
            path,
            self.order,
            lower_order_final=self.lower_order_final,
            last_first_order=False,
            long_steps_first_order=False,
        )
        # columns: x_i, D_i, then the weights of eps_i, eps_{i-1}, ..., eps_{i-p+1}
        cols = torch.zeros(len(orders), self.order + 2, dtype=torch.float64)
        for i, order in enumerate(orders):
            a_t, a_s, s_s = float(path.alpha[i]), float(path.alpha[i + 1]), float(path.sigma[i + 1])
            if a_t == 0.0:  # infinite noise: only the first-order (DDIM) limit is finite
                cols[i, 1], cols[i, 2] = a_s, s_s
                continue
            w = _eps_adams_weights([lam[i + 1]] + [lam[i - j] for j in range(order)], order)
            scale = a_s * math.exp(-lam[i])  # alpha_{i+1} sigma_i / alpha_i
            cols[i, 0] = a_s / a_t
            cols[i, 2 : 2 + order] = torch.tensor([-scale * wj for wj in w])
        return {"coef_x": cols[:, 0], "coef_x0": cols[:, 1], "coef_eps": cols[:, 2:]}

    def init_state(self, x: Tensor) -> State:
        return tuple(torch.zeros_like(x) for _ in range(self.order - 1))

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        pred = denoise(x, c["point"])
        history = (pred.eps, *state)
        x_next = c["coef_x"] * x + c["coef_x0"] * pred.x0
        for j, e_j in enumerate(history):
            x_next = x_next + c["coef_eps"][j] * e_j
        return x_next, history[:-1]
