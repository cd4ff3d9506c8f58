r"""Per-element training losses between the network output and the target.

Contract for a registered loss::

    fn(pred: Tensor, target: Tensor, **loss_kwargs) -> Tensor  # elementwise, pred's shape

The loss must be unreduced: :meth:`tinydiff.DiffusionModel.loss` applies the optional
min-SNR-gamma weighting per sample and returns (bsz, *input_shape).

Min-SNR-:math:`\gamma` weighting (Hang et al. 2023) weighs the loss at each t by
:math:`\min(\mathrm{SNR}_t, \gamma)` measured in x0 space; for a target whose squared error is
:math:`c(\mathrm{SNR})` times the x0 error (see :mod:`tinydiff.targets`) the weight is
:math:`\min(\mathrm{SNR}, \gamma) / c(\mathrm{SNR})`: :math:`\min(\mathrm{SNR},\gamma)/\mathrm{SNR}`
for ``pred_eps``, :math:`\min(\mathrm{SNR},\gamma)` for ``pred_x_0`` and
:math:`\min(\mathrm{SNR},\gamma)/(\mathrm{SNR}+1)` for ``pred_v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinydiff._registry import Registry

__all__ = ["REGISTRY", "get", "huber", "l1", "l2", "min_snr_weight", "names", "register"]

LossFn = Callable[..., Tensor]


def _check_callable(obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"a loss must be callable fn(pred, target, **kwargs), got {obj!r}")


REGISTRY: Registry[LossFn] = Registry("loss", _check_callable)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("l2", aliases=("mse",))
def l2(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error, elementwise."""
    return (pred - target) ** 2


@register("l1", aliases=("mae",))
def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Absolute error, elementwise."""
    return (pred - target).abs()


@register("huber", aliases=("smooth_l1",))
def huber(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """Huber loss, elementwise: quadratic below ``delta``, linear above (Huber 1964)."""
    if not delta > 0:
        raise ValueError(f"huber delta must be > 0, got {delta}")
    return F.huber_loss(pred, target, reduction="none", delta=delta)


def min_snr_weight(snr: Tensor, gamma: float, x0_error_scale: Tensor) -> Tensor:
    """Min-SNR-gamma weight ``min(snr, gamma) / c(snr)`` (Hang et al. 2023).

    Written so that ``snr = 0`` or ``snr = inf`` stays finite when ``c`` grows like snr.

    Args:
        snr: per-sample SNR, any shape.
        gamma: the clamp, > 0.
        x0_error_scale: c(snr) from the target, same shape.
    """
    clamped = torch.clamp(snr, max=gamma)
    return torch.where(
        x0_error_scale > 0, clamped / x0_error_scale.clamp_min(1e-30), torch.ones_like(snr)
    )
