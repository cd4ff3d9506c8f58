"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any respaced subsequence of times."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tinydiff.samplers.base import Denoiser, Sampler, State, register
from tinydiff.variances import posterior_coefficients


def clipped_log_beta_tilde(beta: Tensor, beta_tilde: Tensor) -> Tensor:
    """log(beta_tilde) per step, with a zero entry (the step to t = 0) replaced by the
    neighbouring step's value (Nichol & Dhariwal 2021's clipping), or by log(beta) for a
    one-step plan. Inputs in sampling order, shape (S,)."""
    prev = torch.cat([beta_tilde[:1], beta_tilde[:-1]])
    fallback = torch.where(prev > 0, prev, beta)
    return torch.log(torch.where(beta_tilde > 0, beta_tilde, fallback))


@register("ddpm", aliases=("ancestral",))
class DDPM(Sampler):
    r"""Ancestral sampling from :math:`p(x_s \mid x_t) = \mathcal N(\tilde\mu(\hat x_0, x_t),
    \Sigma)` with the model's variance type (Ho et al. 2020, Alg. 2; respacing as in Nichol &
    Dhariwal 2021, sec. 4). The last step returns the posterior mean without noise.

    NFE: one per step (``sampling_timesteps``).
    """

    stochastic = True

    def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
        coef_x0, coef_xt, beta, beta_tilde = posterior_coefficients(alpha_bar[:-1], alpha_bar[1:])
        noise_mask = torch.ones_like(beta)
        noise_mask[-1] = 0.0
        return {
            "coef_x0": coef_x0,
            "coef_xt": coef_xt,
            "log_beta": torch.log(beta),
            "log_beta_tilde": clipped_log_beta_tilde(beta, beta_tilde),
            "noise_mask": noise_mask,
        }

    def step(
        self,
        x: Tensor,
        state: State,
        c: Mapping[str, Tensor],
        denoise: Denoiser,
        noise: Tensor | None,
    ) -> tuple[Tensor, State]:
        assert noise is not None  # stochastic sampler: the loop always passes noise
        pred = denoise(x, c["t"], c["alpha_bar"])
        mean = c["coef_x0"] * pred.x0 + c["coef_xt"] * x
        log_var = denoise.variance.log_variance(c["log_beta"], c["log_beta_tilde"], pred.var_out)
        return mean + c["noise_mask"] * torch.exp(0.5 * log_var) * noise, state
