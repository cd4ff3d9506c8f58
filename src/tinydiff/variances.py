r"""Variance types: the variance of the reverse (denoising) step, and the posterior tables.

For a step from time t to an earlier time s (s < t; s = t - 1 without respacing) of any
Gaussian process :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`, the transition is
:math:`x_t \mid x_s \sim \mathcal N(\alpha_{t|s} x_s, \beta)` with
:math:`\alpha_{t|s} = \alpha_t/\alpha_s`, :math:`\beta = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2`,
and the forward posterior is :math:`q(x_s \mid x_t, x_0) = \mathcal N(\tilde\mu, \tilde\beta)`:

.. math::
    \tilde\beta = \frac{\sigma_s^2}{\sigma_t^2}\,\beta,\quad
    \tilde\mu = \frac{\alpha_s\,\beta}{\sigma_t^2}\,x_0
              + \frac{\alpha_{t|s}\,\sigma_s^2}{\sigma_t^2}\,x_t

(Kingma et al. 2021, eq. 32-33). On a variance-preserving process (:math:`\alpha^2 = \bar\alpha`)
these are Ho et al. 2020, eq. 6-7: :math:`\beta = 1 - \bar\alpha_t/\bar\alpha_s`; respaced
pairs as in Nichol & Dhariwal 2021.

=============== ===================================================== ======================
name            reverse variance                                      reference
=============== ===================================================== ======================
upper_bound     :math:`\beta`                                         Ho et al. 2020
lower_bound     :math:`\tilde\beta`                                   Ho et al. 2020
learned_range   :math:`\exp(f\log\beta + (1-f)\log\tilde\beta)`,      Nichol & Dhariwal 2021
                :math:`f = (v + 1)/2` from extra network channels
=============== ===================================================== ======================

Contract for a registered variance type: a class (instantiated with ``variance_kwargs``) with

* ``channel_multiplier: int``: the network returns this many times x's channels (dim 1);
* ``split(out) -> (model_out, var_out or None)``: separate the variance channels;
* ``log_variance(log_beta, log_beta_tilde, var_out) -> Tensor``: the reverse step's log
  variance; ``log_beta_tilde`` is clipped (finite) at the last step;
* ``extra_loss(terms) -> Tensor or None``: an extra per-element training loss, given a
  :class:`VlbTerms`.

Subclass :class:`Variance` for defaults (one channel set, no extra loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tinydiff._registry import Registry, class_check
from tinydiff.process import GaussianProcess, Point

__all__ = [
    "REGISTRY",
    "LearnedRange",
    "LowerBound",
    "UpperBound",
    "Variance",
    "VlbTerms",
    "clipped_log_beta_tilde",
    "gaussian_kl",
    "gaussian_posterior",
    "get",
    "names",
    "posterior_coefficients",
    "posterior_tables",
    "register",
    "vlb_extra_loss",
]


def gaussian_posterior(
    alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Coefficients of :math:`q(x_s \mid x_t, x_0)` for s < t on any Gaussian process
    (module docstring).

    Args:
        alpha_t: alpha at the later time t, any shape.
        sigma_t: sigma at t, same shape, > 0.
        alpha_s: alpha at the earlier time s, same shape, > 0.
        sigma_s: sigma at s, same shape.

    Returns:
        (coef_x0, coef_xt, beta, beta_tilde), each of the inputs' shape. Finite for
        alpha_t = 0 (zero terminal SNR) and sigma_s = 0 (s = 0).
    """
    ratio = alpha_t / alpha_s
    var_t = sigma_t**2
    beta = var_t - ratio**2 * sigma_s**2
    coef_x0 = alpha_s * beta / var_t
    coef_xt = ratio * sigma_s**2 / var_t
    beta_tilde = beta * sigma_s**2 / var_t
    return coef_x0, coef_xt, beta, beta_tilde


def posterior_coefficients(
    alpha_bar_t: Tensor, alpha_bar_s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`gaussian_posterior` of a variance-preserving process given by alpha_bar
    (Ho et al. 2020, eq. 6-7): (coef_x0, coef_xt, beta, beta_tilde)."""
    return gaussian_posterior(
        alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt(), alpha_bar_s.sqrt(), (1 - alpha_bar_s).sqrt()
    )


def clipped_log_beta_tilde(beta: Tensor, beta_tilde: Tensor) -> Tensor:
    """log(beta_tilde) per step, with a zero entry (the step to t = 0) replaced by the
    neighbouring step's value (Nichol & Dhariwal 2021's clipping), or by log(beta) for a
    one-step plan. Inputs in sampling order, shape (S,)."""
    prev = torch.cat([beta_tilde[:1], beta_tilde[:-1]])
    fallback = torch.where(prev > 0, prev, beta)
    return torch.log(torch.where(beta_tilde > 0, beta_tilde, fallback))


def posterior_tables(process: GaussianProcess) -> dict[str, Tensor]:
    """float64 tables indexed by integer t = 0..T of the step t -> t - 1 (row 0 unused):
    ``alpha``, ``sigma``, ``snr`` (every row) and ``coef_x0``, ``coef_xt``, ``log_beta``,
    ``log_beta_tilde`` (clipped as in sampling), for the training loss's VLB term."""
    t = torch.arange(process.num_timesteps + 1, dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(t)
    coef_x0, coef_xt, beta, beta_tilde = gaussian_posterior(
        alpha[1:], sigma[1:], alpha[:-1], sigma[:-1]
    )
    # clipped_log_beta_tilde expects sampling order (t decreasing)
    log_bt = clipped_log_beta_tilde(beta.flip(0), beta_tilde.flip(0)).flip(0)
    pad = alpha.new_zeros(1)
    return {
        "alpha": alpha,
        "sigma": sigma,
        "snr": (alpha / sigma) ** 2,
        "coef_x0": torch.cat([pad, coef_x0]),
        "coef_xt": torch.cat([pad, coef_xt]),
        "log_beta": torch.cat([pad, beta.log()]),
        "log_beta_tilde": torch.cat([pad, log_bt]),
    }


def gaussian_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


@dataclass
class VlbTerms:
    """Inputs of a variance type's extra loss for a batch of training times t.

    Every tensor broadcasts against x (bsz, *input_shape); per-sample quantities have shape
    (bsz, 1, ..., 1).

    Attributes:
        x0: clean data.
        x_t: noised data.
        x0_hat: the network's x0 estimate, detached (stop-gradient on the mean).
        var_out: the variance channels of the network output (with gradient), or None.
        coef_x0, coef_xt: posterior mean coefficients for the step t -> t - 1.
        log_beta, log_beta_tilde: log variances of that step (log_beta_tilde clipped).
        is_first: 1.0 where t == 1 (the decoder term), else 0.0.
        num_timesteps: T.
    """

    x0: Tensor
    x_t: Tensor
    x0_hat: Tensor
    var_out: Tensor | None
    coef_x0: Tensor
    coef_xt: Tensor
    log_beta: Tensor
    log_beta_tilde: Tensor
    is_first: Tensor
    num_timesteps: int


def vlb_extra_loss(
    variance: Variance,
    process: GaussianProcess,
    target: Any,
    t: Tensor,
    p: Point,
    x0: Tensor,
    x_t: Tensor,
    model_out: Tensor,
    var_out: Tensor | None,
) -> Tensor | None:
    """The variance type's extra training term (``learned_range``'s VLB, Nichol & Dhariwal
    2021) at integer times t, or None for a type without one.

    The posterior of the step t -> t - 1 comes from the process at t - 1, t and t + 1 (the
    neighbour for the clipped log beta_tilde of the step to t = 0, as in sampling).

    Args:
        variance: the variance type.
        process: the Gaussian process.
        target: the prediction target (its x0 estimate, detached, is the posterior mean's:
            the stop-gradient of Nichol & Dhariwal 2021).
        t: int64 (bsz,) times in 1..T.
        p: the process point at t (`tinydiff.process.Point`).
        x0: clean data (bsz, *input_shape).
        x_t: noised data.
        model_out: the network's mean channels.
        var_out: the network's variance channels, or None.

    Raises:
        ValueError: real-valued times (the VLB term is defined on the integer steps).
    """
    if type(variance).extra_loss is Variance.extra_loss:
        return None
    if t.is_floating_point():
        raise ValueError("this variance type's VLB term needs integer training times t in 1..T")
    view = (-1,) + (1,) * (x0.dim() - 1)
    T = process.num_timesteps
    times = torch.stack([t - 1, t, (t + 1).clamp(max=T)]).to(torch.float64)
    alpha, sigma = process.alpha_sigma(times)
    coef_x0, coef_xt, beta, beta_tilde = gaussian_posterior(
        alpha[1:], sigma[1:], alpha[:-1], sigma[:-1]
    )
    # clipped_log_beta_tilde: a zero beta_tilde (the step to t = 0) takes the next step's
    # value (that of t + 1 -> t), or log beta where there is none
    next_bt = torch.where(t < T, beta_tilde[1], beta_tilde[0])
    fallback = torch.where(next_bt > 0, next_bt, beta[0])
    log_bt = torch.log(torch.where(beta_tilde[0] > 0, beta_tilde[0], fallback))

    def at(v: Tensor) -> Tensor:
        return v.to(x0.dtype).view(view)

    terms = VlbTerms(
        x0=x0,
        x_t=x_t,
        x0_hat=target.to_x0_eps(model_out.detach(), x_t, p)[0],
        var_out=var_out,
        coef_x0=at(coef_x0[0]),
        coef_xt=at(coef_xt[0]),
        log_beta=at(beta[0].log()),
        log_beta_tilde=at(log_bt),
        is_first=(t == 1).to(x0.dtype).view(view),
        num_timesteps=T,
    )
    return variance.extra_loss(terms)


class Variance:
    """Base class: one set of output channels and no extra loss."""

    channel_multiplier: ClassVar[int] = 1

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into (model_out, var_out or None)."""
        return out, None

    def log_variance(
        self, log_beta: Tensor, log_beta_tilde: Tensor, var_out: Tensor | None
    ) -> Tensor:
        """Log variance of the reverse step (broadcasts against x)."""
        raise NotImplementedError

    def extra_loss(self, terms: VlbTerms) -> Tensor | None:
        """Extra per-element training loss, or None."""
        return None


REGISTRY: Registry[type[Variance]] = Registry(
    "variance type",
    class_check(
        "a variance type must be a class with log_variance(log_beta, log_beta_tilde, var_out) "
        "(subclass tinydiff.variances.Variance)",
        methods=("log_variance",),
    ),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("upper_bound", aliases=("fixed_large", "beta"))
class UpperBound(Variance):
    r"""Reverse variance :math:`\beta_t`, the upper bound on the optimal (Ho et al. 2020)."""

    def log_variance(
        self, log_beta: Tensor, log_beta_tilde: Tensor, var_out: Tensor | None
    ) -> Tensor:
        return log_beta


@register("lower_bound", aliases=("fixed_small", "beta_tilde"))
class LowerBound(Variance):
    r"""Reverse variance :math:`\tilde\beta_t`, the posterior variance (Ho et al. 2020)."""

    def log_variance(
        self, log_beta: Tensor, log_beta_tilde: Tensor, var_out: Tensor | None
    ) -> Tensor:
        return log_beta_tilde


@register("learned_range")
class LearnedRange(Variance):
    r"""Learned interpolation between the bounds (Nichol & Dhariwal 2021, eq. 15).

    The network returns twice x's channels; the second half v gives
    :math:`\log\Sigma = f\log\beta + (1-f)\log\tilde\beta` with :math:`f = (v+1)/2`. Training
    adds :math:`\lambda L_\mathrm{vlb}` (hybrid objective, eq. 16) with the mean detached; per
    sample that is :math:`\lambda T L_t = (T / 1000) L_t` in bits for :math:`\lambda` = 0.001. The
    t = 1 term is the continuous Gaussian negative log-likelihood of x0 (data of any range).

    Args:
        vlb_weight: :math:`\lambda`, default 0.001.
    """

    channel_multiplier = 2

    def __init__(self, vlb_weight: float = 0.001) -> None:
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        self.vlb_weight = float(vlb_weight)

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        mean_out, var_out = out.chunk(2, dim=1)
        return mean_out, var_out

    def log_variance(
        self, log_beta: Tensor, log_beta_tilde: Tensor, var_out: Tensor | None
    ) -> Tensor:
        if var_out is None:
            raise ValueError("learned_range needs the network's variance channels")
        frac = (var_out + 1) / 2
        return frac * log_beta + (1 - frac) * log_beta_tilde

    def extra_loss(self, terms: VlbTerms) -> Tensor | None:
        logvar = self.log_variance(terms.log_beta, terms.log_beta_tilde, terms.var_out)
        mean_p = terms.coef_x0 * terms.x0_hat + terms.coef_xt * terms.x_t
        mean_q = terms.coef_x0 * terms.x0 + terms.coef_xt * terms.x_t
        kl = gaussian_kl(mean_q, terms.log_beta_tilde, mean_p, logvar)
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (terms.x0 - mean_p) ** 2 * torch.exp(-logvar))
        vlb_bits = torch.where(terms.is_first > 0, nll, kl) / math.log(2.0)
        return self.vlb_weight * terms.num_timesteps * vlb_bits
