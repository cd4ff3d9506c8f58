r"""Prediction targets: what the network is trained to output.

With :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`:

=========== ================================================================ ===================
name        network output                                                   reference
=========== ================================================================ ===================
pred_eps    :math:`\epsilon`                                                 Ho et al. 2020
pred_x_0    :math:`x_0`                                                      Ho et al. 2020
pred_v      :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0` Salimans & Ho 2022
=========== ================================================================ ===================

Contract for a registered target: a class (instantiated with ``target_kwargs``) with

* ``target(x0, eps, alpha_bar) -> Tensor``: the training target;
* ``to_x0_eps(out, x_t, alpha_bar) -> (x0_hat, eps_hat)``: convert the network output;
* ``x0_error_scale(snr) -> Tensor``: the factor c(snr) such that the squared error in target
  space is c(snr) times the squared error of the implied x0 (used by min-SNR weighting);
* ``supports_zero_snr: bool``: whether the conversions are finite at alpha_bar = 0.

``alpha_bar`` is float and broadcasts against x (shape (bsz, 1, ..., 1)); every tensor has
x's shape. Subclass :class:`Target` to get the checks for free.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from tinydiff._registry import Registry

__all__ = ["REGISTRY", "PredEps", "PredV", "PredX0", "Target", "get", "names", "register"]


class Target:
    """Base class for prediction targets. Subclasses implement the three conversions."""

    supports_zero_snr: ClassVar[bool] = True

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        """The training target for clean data ``x0`` and noise ``eps``."""
        raise NotImplementedError

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """Convert a network output into (x0_hat, eps_hat)."""
        raise NotImplementedError

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        """c(snr) with ||target error||^2 = c(snr) * ||x0 error||^2."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define x0_error_scale, needed by min_snr_gamma"
        )


def _check_target(obj: Any) -> None:
    if not isinstance(obj, type) or not all(
        callable(getattr(obj, m, None)) for m in ("target", "to_x0_eps")
    ):
        raise TypeError(
            "a prediction target must be a class with target(x0, eps, alpha_bar) and "
            f"to_x0_eps(out, x_t, alpha_bar) methods (subclass tinydiff.targets.Target); got {obj!r}"
        )


REGISTRY: Registry[type[Target]] = Registry("prediction target", _check_target)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("pred_eps", aliases=("eps", "epsilon"))
class PredEps(Target):
    r"""Predict the noise :math:`\epsilon` (Ho et al. 2020).

    Ill-posed at zero SNR: there :math:`x_t = \epsilon` carries no information about x0, so
    the combination with ``zero_terminal_snr=True`` is refused when the config is built.
    """

    supports_zero_snr = False

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return eps

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        x0 = (x_t - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()
        return x0, out

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return snr


@register("pred_x_0", aliases=("pred_x0", "x0", "sample"))
class PredX0(Target):
    r"""Predict the clean data :math:`x_0` (Ho et al. 2020)."""

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        # at alpha_bar = 1 (t = 0, never a network input) eps is undefined: clamp keeps it finite
        eps = (x_t - alpha_bar.sqrt() * out) / (1 - alpha_bar).clamp_min(1e-20).sqrt()
        return out, eps

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


@register("pred_v", aliases=("v", "v_prediction"))
class PredV(Target):
    r"""Predict the velocity :math:`v = \sqrt{\bar\alpha}\,\epsilon - \sqrt{1-\bar\alpha}\,x_0`
    (Salimans & Ho 2022). Well posed at every SNR, zero included."""

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return a * x_t - s * out, s * x_t + a * out

    def x0_error_scale(self, snr: Tensor) -> Tensor:
        return snr + 1
