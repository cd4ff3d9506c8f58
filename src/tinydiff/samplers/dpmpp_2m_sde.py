r"""DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", sec. 5; the second-order
multistep form popularised by k-diffusion's ``sample_dpmpp_2m_sde``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from tinydiff._validation import check_number
from tinydiff.process import PathValues
from tinydiff.samplers._exp import first_order, step_orders
from tinydiff.samplers.base import Denoiser, Noise, Row, State, StepResult, register
from tinydiff.samplers.dpmpp_2m import DPMSolverPP2M, midpoint_weight


@register("dpmpp_2m_sde", aliases=("dpm_solver_pp_2m_sde", "dpmsolver++_2m_sde"))
class DPMSolverPP2MSDE(DPMSolverPP2M):
    r"""Second-order multistep solver of the reverse SDE in data-prediction form.

    With :math:`h = \lambda_{i+1} - \lambda_i` and :math:`\eta \ge 0`, step i is the exact
    solution of the linear part of the SDE plus the D-integral of Lu et al. 2022 (eq. 18)
    with a linear-in-lambda D (midpoint form, as in Alg. 2):

    .. math::
        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}e^{-\eta h}x_i
        + \alpha_{i+1}(1 - e^{-(1+\eta)h})\Big[D_i + \frac{1}{2r_i}(D_i - D_{i-1})\Big]
        + \sigma_{i+1}\sqrt{1 - e^{-2\eta h}}\,z, \quad r_i = h_{i-1}/h_i.

    eta = 1 is the SDE of DPM-Solver++ (the reverse diffusion SDE); eta = 0 is exactly
    :class:`~tinydiff.samplers.dpmpp_2m.DPMSolverPP2M`. The history weight is 0 on the first
    step, after an infinite-noise start (zero terminal SNR) and on the last step to t = 0
    (h = inf, where the update is :math:`x_S = D_{S-1}` with no noise).

    Args:
        eta: noise scale, >= 0 (default 1).

    State: the previous denoiser output. NFE: one per step, ``nfe(S) = S``.
    """

    stochastic = True
    tunable: ClassVar[Mapping[str, tuple[float, float]]] = {}  # not dpmpp_2m's
    per_step: ClassVar[Mapping[str, float]] = {}

    def __init__(self, eta: float = 1.0) -> None:
        self.eta = check_number("eta", eta, min=0.0, owner="dpmpp_2m_sde")

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        eta = self.eta
        rows = []
        for i, order in enumerate(step_orders(path, 2)):
            if eta == 0:  # exactly DPM-Solver++(2M)
                coef_x, coef_d = first_order(path, i)
                coef_noise = 0.0
            else:
                h = float(
                    path.lam[i + 1] - path.lam[i]
                )  # +inf at an infinite-noise start or the end
                s_t, s_s = float(path.sigma[i]), float(path.sigma[i + 1])
                a_s = float(path.alpha[i + 1])
                coef_x = s_s / s_t * math.exp(-eta * h)
                coef_d = a_s * -math.expm1(-(1 + eta) * h)
                coef_noise = s_s * math.sqrt(-math.expm1(-2 * eta * h))
            half_inv_r = midpoint_weight(path, i) if order == 2 else 0.0
            rows.append((coef_x, coef_d * (1 + half_inv_r), -coef_d * half_inv_r, coef_noise))
        cols = torch.tensor(rows, dtype=torch.float64)
        return {
            "coef_x": cols[:, 0],
            "coef_d": cols[:, 1],
            "coef_prev": cols[:, 2],
            "coef_noise": cols[:, 3],
        }

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        x_next, state = super().step(x, state, c, denoise, noise)
        if noise is not None:
            x_next = x_next + c["coef_noise"] * noise
        return x_next, state
