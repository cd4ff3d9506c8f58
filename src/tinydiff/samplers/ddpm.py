"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any respaced subsequence of times."""

from __future__ import annotations

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register
from tinydiff.variances import clipped_log_beta_tilde, gaussian_posterior


@register("ddpm", aliases=("ancestral",))
class DDPM(Sampler):
    r"""Ancestral sampling from :math:`p(x_s \mid x_t) = \mathcal N(\tilde\mu(\hat x_0, x_t),
    \Sigma)` with the model's variance type, on any Gaussian path (the posterior of
    :func:`tinydiff.variances.gaussian_posterior`) (Ho et al. 2020, Alg. 2; respacing as in Nichol &
    Dhariwal 2021, sec. 4). The last step returns the posterior mean without noise.

    NFE: one per step (``sampling_timesteps``).
    """

    stochastic = True

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        coef_x0, coef_xt, beta, beta_tilde = gaussian_posterior(
            path.alpha[:-1], path.sigma[:-1], path.alpha[1:], path.sigma[1:]
        )
        noise_mask = torch.ones_like(beta)
        noise_mask[-1] = 0.0
        return {
            "coef_x0": coef_x0,
            "coef_xt": coef_xt,
            "log_beta": torch.log(beta),
            "log_beta_tilde": clipped_log_beta_tilde(beta, beta_tilde),
            "noise_mask": noise_mask,
        }

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        assert noise is not None  # stochastic sampler: the loop always passes noise
        pred = denoise(x, c["point"])
        mean = c["coef_x0"] * pred.x0 + c["coef_xt"] * x
        log_var = denoise.variance.log_variance(c["log_beta"], c["log_beta_tilde"], pred.var_out)
        return mean + c["noise_mask"] * torch.exp(0.5 * log_var) * noise, state
