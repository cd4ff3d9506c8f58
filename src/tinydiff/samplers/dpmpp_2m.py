r"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Alg. 2)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tinydiff.samplers._vp import finite_history, first_order, vp
from tinydiff.samplers.base import Denoiser, Sampler, State, register


@register("dpmpp_2m", aliases=("dpm_solver_pp_2m", "dpmsolver++_2m"))
class DPMSolverPP2M(Sampler):
    r"""Second-order multistep solver of the data-prediction probability-flow ODE in
    :math:`\lambda = \log(\alpha/\sigma)` (Lu et al. 2022, Alg. 2):

    .. math::
        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})
        \Big[\Big(1 + \frac{1}{2r_i}\Big)D_i - \frac{1}{2r_i}D_{i-1}\Big],
        \quad r_i = h_{i-1}/h_i.

    Lower order where a second point is unavailable, expressed as a zero history weight:
    the first step, the step after an infinite-noise start (zero terminal SNR: lambda_0 is
    -inf, so D_0 cannot enter a polynomial in lambda), and the last step to t = 0, where
    h = +inf and the exact first-order update is :math:`x_S = D_{S-1}` (so the
    ``lower_order_final`` switch of other implementations is built in, not an option).

    State: the previous denoiser output. NFE: one per step, ``nfe(S) = S``.
    """

    #: geometric mean over benchmarks/sampler_quality.py's grid of error / best spacing's: 1.36
    default_spacing = "logsnr_trailing"

    def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
        v = vp(alpha_bar)
        num_steps = timesteps.numel() - 1
        cx, cd, cprev = [], [], []
        for i in range(num_steps):
            ratio, w = first_order(v, i)
            second = i < num_steps - 1 and finite_history(v, i) >= 2
            if second:
                h = float(v.lam[i + 1] - v.lam[i])
                h_prev = float(v.lam[i] - v.lam[i - 1])
                half_inv_r = 0.5 * h / h_prev
                cx.append(ratio)
                cd.append(w * (1 + half_inv_r))
                cprev.append(-w * half_inv_r)
            else:
                cx.append(ratio)
                cd.append(w)
                cprev.append(0.0)
        f64 = torch.float64
        return {
            "coef_x": torch.tensor(cx, dtype=f64),
            "coef_d": torch.tensor(cd, dtype=f64),
            "coef_prev": torch.tensor(cprev, dtype=f64),
        }

    def init_state(self, x: Tensor) -> State:
        return (torch.zeros_like(x),)

    def step(
        self,
        x: Tensor,
        state: State,
        c: Mapping[str, Tensor],
        denoise: Denoiser,
        noise: Tensor | None,
    ) -> tuple[Tensor, State]:
        (d_prev,) = state
        d = denoise(x, c["t"], c["alpha_bar"]).x0
        x_next = c["coef_x"] * x + c["coef_d"] * d + c["coef_prev"] * d_prev
        return x_next, (d,)
