r"""Prediction targets: what the network is trained to output.

With :math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\epsilon` (any process of :mod:`tinydiff.process`):

=========== ================================================================ ===================
name        network output                                                   reference
=========== ================================================================ ===================
pred_eps    :math:`\epsilon`                                                 Ho et al. 2020
pred_x_0    :math:`x_0`                                                      Ho et al. 2020
pred_v      :math:`v = \alpha\,\epsilon - \sigma\,x_0`                                Salimans & Ho 2022
=========== ================================================================ ===================

Contract for a registered target: a class (instantiated with ``target_kwargs``) with

* ``target(x0, eps, p) -> Tensor``: the training target;
* ``to_x0_eps(out, x_t, p) -> (x0_hat, eps_hat)``: convert the network output;
* ``network_input(x_t, p) -> (input, time)``: what the network is called with (default
  ``(x_t, p.t)``; preconditioned targets such as EDM's scale both);
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

import inspect
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from tinydiff._registry import Registry
from tinydiff.process import Point

__all__ = [
    "REGISTRY",
    "PredEps",
    "PredV",
    "PredX0",
    "Target",
    "build",
    "get",
    "names",
    "register",
]


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

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """c(snr) with ||target error||^2 = c(snr) * ||x0 error||^2."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define x0_error_scale, needed by min_snr_gamma"
        )


class _LegacyTarget(Target):
    """Adapter for targets written for tinydiff 0.1 (``alpha_bar`` instead of a point); valid
    on variance-preserving processes, where alpha_bar = alpha^2."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.supports_zero_snr = getattr(inner, "supports_zero_snr", True)  # type: ignore[misc]

    def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
        return self.inner.target(x0, eps, p.alpha**2)

    def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
        return self.inner.to_x0_eps(out, x_t, p.alpha**2)

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return self.inner.x0_error_scale(snr)


def build(name: str, kwargs: dict[str, Any] | None = None) -> Target:
    """Instantiate a registered target; a 0.1-style one (methods taking ``alpha_bar``) is
    adapted, with a DeprecationWarning."""
    cls = get(name)
    obj = cls(**(kwargs or {}))
    params = list(inspect.signature(obj.target).parameters)
    if len(params) >= 3 and params[2] == "alpha_bar":
        warnings.warn(
            f"prediction target {name!r} uses the tinydiff 0.1 contract target(x0, eps, "
            "alpha_bar); write target(x0, eps, p) with p a tinydiff.process.Point "
            "(p.alpha, p.sigma, ...) to support every process",
            DeprecationWarning,
            stacklevel=2,
        )
        return _LegacyTarget(obj)
    return obj


def _check_target(obj: Any) -> None:
    if not isinstance(obj, type) or not all(
        callable(getattr(obj, m, None)) for m in ("target", "to_x0_eps")
    ):
        raise TypeError(
            "a prediction target must be a class with target(x0, eps, p) and "
            f"to_x0_eps(out, x_t, p) methods (subclass tinydiff.targets.Target); got {obj!r}"
        )


REGISTRY: Registry[type[Target]] = Registry("prediction target", _check_target)
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
