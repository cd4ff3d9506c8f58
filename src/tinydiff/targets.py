r"""Prediction targets: what the network is trained to output.

With :math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\epsilon` (any process of :mod:`tinydiff.process`):

=========== ================================================================ ===================
name        network output                                                   reference
=========== ================================================================ ===================
pred_eps    :math:`\epsilon`                                                 Ho et al. 2020
pred_x_0    :math:`x_0`                                                      Ho et al. 2020
pred_v      :math:`v = \alpha\,\epsilon - \sigma\,x_0`                                Salimans & Ho 2022
pred_velocity :math:`u = dx_t/ds = \alpha'(s)\,x_0 + \sigma'(s)\,\epsilon` (s = t/T)  Lipman et al. 2023
edm         :math:`F` of :math:`D = c_{skip}x_t + c_{out}F` (preconditioned)    Karras et al. 2022
=========== ================================================================ ===================

Contract for a registered target: a class (instantiated with ``target_kwargs``) with

* ``target(x0, eps, p) -> Tensor``: the training target;
* ``to_x0_eps(out, x_t, p) -> (x0_hat, eps_hat)``: convert the network output;
* ``network_input(x_t, p) -> (input, time)``: what the network is called with (default
  ``(x_t, p.t)``; preconditioned targets such as EDM's scale both), and its inverse
  ``from_network_input(x_in, t_in, process) -> (x_t, t)`` (used by test oracles such as
  :class:`tinydiff.testing.ExactDenoiser`);
* ``x0_error_scale(snr) -> Tensor``: the factor c(snr) such that the squared error in target
  space is c(snr) times the squared error of the implied x0 (used by min-SNR weighting);
* ``supports_zero_snr: bool``: whether the conversions are finite at alpha = 0.

``p`` is a :class:`tinydiff.process.Point`: the network time ``p.t`` and ``p.alpha``,
``p.sigma``, ``p.d_alpha``, ``p.d_sigma`` (derivatives in s = t / T), each broadcasting against
x (shape (bsz, 1, ..., 1) or 0-dim). Subclass :class:`Target` for the defaults. A target
written for tinydiff 0.1 (``alpha_bar`` in place of ``p``) still works on variance-preserving
processes, with a DeprecationWarning.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from tinydiff._registry import Registry, class_check
from tinydiff.process import GaussianProcess, Point

__all__ = [
    "EDM",
    "REGISTRY",
    "PredEps",
    "PredV",
    "PredVelocity",
    "PredX0",
    "Prediction",
    "Target",
    "build",
    "get",
    "names",
    "register",
]


class Prediction(NamedTuple):
    """The denoiser's output at one (x_t, t).

    Attributes:
        x0: estimate of the clean data, x's shape.
        eps: estimate of the noise, x's shape.
        var_out: the network's variance channels (``learned_range``), or None.
    """

    x0: Tensor
    eps: Tensor
    var_out: Tensor | None


class Target:
    """Base class for prediction targets. Subclasses implement :meth:`target` and
    :meth:`to_x0_eps`; :meth:`network_input` defaults to the raw (x_t, t)."""

    supports_zero_snr: ClassVar[bool] = True
    #: whether the conversions read ``p.d_alpha`` / ``p.d_sigma`` (velocity targets)
    uses_derivatives: ClassVar[bool] = False

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        """The training target for clean data ``x0`` and noise ``eps`` at point ``p``."""
        raise NotImplementedError

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        """Convert a network output into (x0_hat, eps_hat)."""
        raise NotImplementedError

    def network_input(self, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        """What the network is called with at x_t: (input, time); default (x_t, p.t)."""
        return x_t, p.t

    def from_network_input(
        self, x_in: Tensor, t_in: Tensor, process: GaussianProcess
    ) -> tuple[Tensor, Tensor]:
        """Invert :meth:`network_input`: (x_t, t) from what the network received (t float64,
        (bsz,)); the default is the identity."""
        return x_in, t_in.to(torch.float64)

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """c(snr) with ||target error||^2 = c(snr) * ||x0 error||^2."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define x0_error_scale, needed by min_snr_gamma"
        )


def build(name: str, kwargs: dict[str, Any] | None = None) -> Target:
    """Instantiate a registered target with its options (a 0.1-style target is adapted at
    registration, `tinydiff.compat`)."""
    return get(name)(**(kwargs or {}))  # type: ignore[no-any-return]


REGISTRY: Registry[type[Target]] = Registry(
    "prediction target",
    class_check(
        "a prediction target must be a class with target(x0, eps, p) and to_x0_eps(out, x_t, p) "
        "methods (subclass tinydiff.targets.Target)",
        methods=("target", "to_x0_eps"),
    ),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("pred_eps", aliases=("eps", "epsilon"))
class PredEps(Target):
    r"""Predict the noise :math:`\epsilon` (Ho et al. 2020):
    :math:`\hat x_0 = (x_t - \sigma\hat\epsilon)/\alpha`.

    Ill-posed at zero SNR: there :math:`x_t = \epsilon` carries no information about x0, so
    the combination with ``zero_terminal_snr=True`` is refused when the config is built.
    """

    supports_zero_snr = False

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        return eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        return (x_t - p.sigma * out) / p.alpha, out

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return snr


@register("pred_x_0", aliases=("pred_x0", "x0", "sample"))
class PredX0(Target):
    r"""Predict the clean data :math:`x_0` (Ho et al. 2020):
    :math:`\hat\epsilon = (x_t - \alpha\hat x_0)/\sigma`."""

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        return x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        # at sigma = 0 (t = 0, never a network input) eps is undefined: clamp keeps it finite
        return out, (x_t - p.alpha * out) / p.sigma.clamp_min(1e-10)

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


@register("pred_v", aliases=("v", "v_prediction"))
class PredV(Target):
    r"""Predict :math:`v = \alpha\,\epsilon - \sigma\,x_0` (Salimans & Ho 2022):
    :math:`\hat x_0 = (\alpha x_t - \sigma v)/(\alpha^2+\sigma^2)`,
    :math:`\hat\epsilon = (\sigma x_t + \alpha v)/(\alpha^2+\sigma^2)` (the denominator is 1
    on variance-preserving processes). Well posed at every SNR, zero included."""

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        return p.alpha * eps - p.sigma * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        a, s = p.alpha, p.sigma
        norm = a * a + s * s
        return (a * x_t - s * out) / norm, (s * x_t + a * out) / norm

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return snr + 1


@register("pred_velocity", aliases=("velocity", "flow", "u"))
class PredVelocity(Target):
    r"""Predict the velocity of the path (flow matching: Lipman et al. 2023; Liu et al. 2022):
    :math:`u = dx_t/ds = \alpha'(s)\,x_0 + \sigma'(s)\,\epsilon`, in units of s = t / T.

    On ``rectified_flow`` (shift 1) :math:`u = \epsilon - x_0`. Conversion: (x_t, u) is a
    linear image of (x0, eps) with determinant :math:`\Delta = \alpha\sigma' - \sigma\alpha'`
    (:math:`= -\alpha\sigma\,d\lambda/ds > 0`), so
    :math:`\hat x_0 = (\sigma' x_t - \sigma u)/\Delta`,
    :math:`\hat\epsilon = (\alpha u - \alpha' x_t)/\Delta`. Finite at alpha = 0 (pure
    noise) and sigma = 0 as long as the path's derivatives are.
    """

    uses_derivatives = True

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        return p.d_alpha * x0 + p.d_sigma * eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        det = p.alpha * p.d_sigma - p.sigma * p.d_alpha
        return (p.d_sigma * x_t - p.sigma * out) / det, (p.alpha * out - p.d_alpha * x_t) / det


@register("edm", aliases=("karras_precond", "edm_precond"))
class EDM(Target):
    r"""EDM's preconditioning (Karras et al. 2022, Table 1): the network F is called as
    :math:`F(c_{in}x_t, c_{noise})` and :math:`D = c_{skip}x_t + c_{out}F`, with

    .. math::
        c_{skip} = \frac{\alpha\,s_d^2}{\alpha^2 s_d^2 + \sigma^2},\quad
        c_{out} = \frac{\sigma s_d}{\sqrt{\alpha^2 s_d^2 + \sigma^2}},\quad
        c_{in} = \frac{1}{\sqrt{\alpha^2 s_d^2 + \sigma^2}},\quad
        c_{noise} = \tfrac14\ln(\sigma/\alpha),

    which are Karras et al.'s on the variance-exploding ``edm`` path (alpha = 1) and their
    natural form on any Gaussian path (unit-variance input for data of std s_d; D the
    Wiener filter of x_t at F = 0). The training target is
    :math:`F^* = (x_0 - c_{skip}x_t)/c_{out}`, so the plain l2 loss on F is EDM's weighted
    loss :math:`\lambda(\sigma)\lVert D - x_0\rVert^2` with
    :math:`\lambda = (\sigma^2 + s_d^2)/(\sigma s_d)^2 = 1/c_{out}^2` (their eq. 8).

    The network time is c_noise, not t: the target needs finite lambda at every network
    input, so paths with alpha(T) = 0 (``rectified_flow``, zero terminal SNR) are refused.

    Args:
        sigma_data: s_d, the data's standard deviation (default 0.5).
    """

    supports_zero_snr = False

    def __init__(self, sigma_data: float = 0.5) -> None:
        if (
            isinstance(sigma_data, bool)
            or not isinstance(sigma_data, (int, float))
            or not sigma_data > 0
        ):
            raise ValueError(f"edm sigma_data must be a number > 0, got {sigma_data!r}")
        self.sigma_data = float(sigma_data)

    def _coefs(self, p: Point) -> tuple[Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        norm = (p.alpha**2 * sd**2 + p.sigma**2).sqrt()
        return p.alpha * sd**2 / norm**2, p.sigma * sd / norm, 1 / norm

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        c_skip, c_out, _ = self._coefs(p)
        x_t = p.alpha * x0 + p.sigma * eps
        return (x0 - c_skip * x_t) / c_out

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _ = self._coefs(p)
        x0 = c_skip * x_t + c_out * out
        return x0, (x_t - p.alpha * x0) / p.sigma.clamp_min(1e-30)

    def network_input(self, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        _, _, c_in = self._coefs(p)
        c_noise = 0.25 * (torch.log(p.sigma.to(p.t.dtype)) - torch.log(p.alpha.to(p.t.dtype)))
        return c_in * x_t, c_noise

    def from_network_input(
        self, x_in: Tensor, t_in: Tensor, process: GaussianProcess
    ) -> tuple[Tensor, Tensor]:
        lo, hi = process.lam_range()
        lam = (-4 * t_in.to(torch.float64).cpu()).clamp(min=lo, max=hi)  # rounding of t_in
        t = process.time_at_lam(lam).to(t_in.device)
        alpha, sigma = process.alpha_sigma(t)
        view = (-1,) + (1,) * (x_in.dim() - 1)
        norm = (alpha**2 * self.sigma_data**2 + sigma**2).sqrt().to(x_in.dtype).view(view)
        return x_in * norm, t

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        # ||F error||^2 = ||D error||^2 / c_out^2 and 1 / c_out^2 = snr + 1 / s_d^2
        return snr + 1 / self.sigma_data**2
