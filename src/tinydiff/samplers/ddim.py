"""DDIM (Song et al. 2021): the non-Markovian sampler with a stochasticity knob ``eta``."""

from __future__ import annotations

from torch import Tensor

from tinydiff._validation import check_number
from tinydiff.process import PathValues
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register
from tinydiff.variances import gaussian_posterior


@register("ddim")
class DDIM(Sampler):
    r"""DDIM update (Song et al. 2021, eq. 12), on any Gaussian path:

    .. math::
        x_s = \alpha_s\,\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon
              + c\,z, \qquad c = \eta\,\sqrt{\tilde\beta_{s,t}}

    (:math:`\alpha_s = \sqrt{\bar\alpha_s}`, :math:`\sigma_s^2 = 1 - \bar\alpha_s` on a
    variance-preserving process).

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

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        alpha_s, sigma_s = path.alpha[1:], path.sigma[1:]
        *_, beta_tilde = gaussian_posterior(path.alpha[:-1], path.sigma[:-1], alpha_s, sigma_s)
        noise = self.eta * beta_tilde.sqrt()
        return {
            "coef_x0": alpha_s,
            "coef_eps": (sigma_s**2 - noise**2).clamp_min(0).sqrt(),
            "sigma": noise,
        }

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        pred = denoise(x, c["point"])
        x_next = c["coef_x0"] * pred.x0 + c["coef_eps"] * pred.eps
        if noise is not None:
            x_next = x_next + c["sigma"] * noise
        return x_next, state
