"""DDIM (Song et al. 2021): the non-Markovian sampler with a stochasticity knob ``eta``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from tinydiff._validation import check_number
from tinydiff.samplers.base import Denoiser, Sampler, State, register
from tinydiff.variances import posterior_coefficients


@register("ddim")
class DDIM(Sampler):
    r"""DDIM update (Song et al. 2021, eq. 12):

    .. math::
        x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon
              + \sigma z, \qquad \sigma = \eta\,\sqrt{\tilde\beta_{s,t}}.

    ``eta=0`` is deterministic (a first-order solver of the probability-flow ODE);
    ``eta=1`` is exactly DDPM ancestral sampling with the ``lower_bound`` variance.

    Args:
        eta: noise scale, >= 0.

    NFE: one per step.
    """

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = check_number("eta", eta, min=0.0, owner="ddim")

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
        ab_s = alpha_bar[1:]
        *_, beta_tilde = posterior_coefficients(alpha_bar[:-1], ab_s)
        sigma = self.eta * beta_tilde.sqrt()
        return {
            "coef_x0": ab_s.sqrt(),
            "coef_eps": (1 - ab_s - sigma**2).clamp_min(0).sqrt(),
            "sigma": sigma,
        }

    def step(
        self,
        x: Tensor,
        state: State,
        c: Mapping[str, Tensor],
        denoise: Denoiser,
        noise: Tensor | None,
    ) -> tuple[Tensor, State]:
        pred = denoise(x, c["t"], c["alpha_bar"])
        x_next = c["coef_x0"] * pred.x0 + c["coef_eps"] * pred.eps
        if noise is not None:
            x_next = x_next + c["sigma"] * noise
        return x_next, state
