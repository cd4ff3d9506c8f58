r"""Euler's method for the probability-flow ODE (Karras et al. 2022, sec. 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import first_order
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register


@register("euler")
class Euler(Sampler):
    r"""First-order Euler steps of the probability-flow ODE in Karras' variables.

    With :math:`y = x/\alpha` and the noise level :math:`\hat\sigma = \sigma/\alpha = e^{-\lambda}`
    (any Gaussian path) the ODE reads :math:`dy/d\hat\sigma = (y - D(y))/\hat\sigma`
    (Karras et al. 2022, eq. 4 with s = 1); one Euler step in :math:`\hat\sigma`, mapped back to
    x, is

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t}\,x_t + \Big(\alpha_s - \alpha_t\frac{\sigma_s}{\sigma_t}\Big)\hat x_0.

    The coefficients are computed from alpha and sigma, so they stay finite at infinite noise
    (:math:`\alpha_t = 0`: the first step is :math:`x_s = \sigma_s x_T + \alpha_s \hat x_0`,
    the exact limit) and at t = 0 (the last step returns :math:`\hat x_0`). This is
    algebraically the same update as DDIM with eta = 0 (Song et al. 2021, eq. 13; Karras et
    al. 2022, sec. 3), computed from x0 instead of eps.

    NFE: one per step, ``nfe(S) = S``.
    """

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        coefs = [first_order(path, i) for i in range(path.t.numel() - 1)]
        return {
            "coef_x": torch.tensor([c[0] for c in coefs], dtype=torch.float64),
            "coef_x0": torch.tensor([c[1] for c in coefs], dtype=torch.float64),
        }

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        pred = denoise(x, c["point"])
        return c["coef_x"] * x + c["coef_x0"] * pred.x0, state
