r"""Training-time distributions: where on the process the training loss looks.

:meth:`tinydiff.DiffusionModel.loss` draws one network time per sample from the configured
distribution (config fields ``time_sampling`` and ``time_sampling_kwargs``; ``None`` picks
the process's default, :func:`tinydiff.schedules.default_time_sampling`):

================== ======================================================== ==================
name               times                                                    reference
================== ======================================================== ==================
uniform_discrete   integers uniform in 1..T (default for discrete VP)        Ho et al. 2020
uniform            t = T (1 - u), u ~ U[0, 1): uniform on (0, T]             Song et al. 2021
logit_normal       s = sigmoid(m + s_std z), t = T s (default for            Esser et al. 2024
                   ``rectified_flow``; the path's shift then applies)
log_normal         ln(sigma / alpha) ~ N(P_mean, P_std^2), t = t(lambda),   Karras et al. 2022
                   clamped to the process's range (default for ``edm``)
================== ======================================================== ==================

Contract for a registered distribution::

    fn(bsz, process, *, generator, device, **kwargs) -> Tensor  # (bsz,) times in (0, T]

returning integer times (int64) or float64 times; the loss reads alpha and sigma from the
process's integer tables for integer times and from :meth:`GaussianProcess.alpha_sigma`
otherwise. t = 0 (sigma = 0 on most paths) is never drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tinydiff._registry import Registry
from tinydiff.process import GaussianProcess

__all__ = [
    "REGISTRY",
    "get",
    "names",
    "register",
    "sample_times",
    "training_times",
]

TimeSampler = Callable[..., Tensor]


def _check_callable(obj: Any) -> None:
    if not callable(obj):
        raise TypeError(
            "a time-sampling distribution must be callable fn(bsz, process, *, generator, "
            f"device, **kwargs) -> times (bsz,); got {obj!r}"
        )


REGISTRY: Registry[TimeSampler] = Registry("time-sampling distribution", _check_callable)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

_F64 = torch.float64


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@register("uniform_discrete", aliases=("discrete", "randint"))
def uniform_discrete(
    bsz: int,
    process: GaussianProcess,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Integers uniform in 1..T (Ho et al. 2020), int64 (bsz,)."""
    T = process.num_timesteps
    return torch.randint(1, T + 1, (bsz,), device=device, generator=generator)


@register("uniform", aliases=("uniform_continuous",))
def uniform(
    bsz: int,
    process: GaussianProcess,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """t = T (1 - u), u ~ U[0, 1): uniform on (0, T], float64 (bsz,)."""
    u = torch.rand(bsz, generator=generator, device=device, dtype=_F64)
    return process.num_timesteps * (1 - u)


@register("logit_normal", aliases=("lognorm_sd3", "sd3"))
def logit_normal(
    bsz: int,
    process: GaussianProcess,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    m: float = 0.0,
    s: float = 1.0,
) -> Tensor:
    r"""Logit-normal times (Esser et al. 2024, sec. 3.1): :math:`t/T = \mathrm{sigmoid}(m + s z)`,
    z ~ N(0, 1), float64 (bsz,). On ``rectified_flow`` the path's shift is applied on top, as
    in SD3 (the shift lives in the process)."""
    m, s = _number("logit_normal m", m), _positive("logit_normal s", s)
    z = torch.randn(bsz, generator=generator, device=device, dtype=_F64)
    frac = torch.sigmoid(m + s * z)
    # t = 0 (frac underflowing to 0) has sigma = 0: keep one float64 ulp of T above it
    return (process.num_timesteps * frac).clamp(min=process.num_timesteps * 1e-12)


@register("log_normal", aliases=("lognormal", "edm"))
def log_normal(
    bsz: int,
    process: GaussianProcess,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    P_mean: float = -1.2,
    P_std: float = 1.2,
) -> Tensor:
    r"""EDM's training noise levels (Karras et al. 2022, Table 1):
    :math:`\ln\hat\sigma \sim \mathcal N(P_{mean}, P_{std}^2)` for the Karras noise level
    :math:`\hat\sigma = \sigma/\alpha = e^{-\lambda}`, mapped to the time with that lambda
    (:meth:`~tinydiff.process.GaussianProcess.time_at_lam`) after clamping lambda to the
    process's range (EDM's sigma in [sigma_min, sigma_max]), float64 (bsz,). Computed on the
    CPU (the inverse may bisect) and moved to ``device``."""
    P_mean, P_std = _number("log_normal P_mean", P_mean), _positive("log_normal P_std", P_std)
    z = torch.randn(bsz, generator=generator, device=device, dtype=_F64)
    lam = -(P_mean + P_std * z).cpu()
    lo, hi = process.lam_range()
    lam = lam.clamp(min=max(lo, -1e300), max=min(hi, 1e300))
    t = process.time_at_lam(lam)
    # t = 0 is sigma = 0 on most paths: never drawn
    return t.clamp(min=process.num_timesteps * 1e-9).to(device)


def sample_times(
    name: str,
    bsz: int,
    process: GaussianProcess,
    kwargs: dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw ``bsz`` training times from the registered distribution ``name``.

    Returns:
        (bsz,) int64 (integer times in 1..T) or float64 times in (0, T], on ``device``.

    Raises:
        ValueError: the distribution returned the wrong shape or times outside (0, T].
    """
    fn = get(name)
    t = torch.as_tensor(fn(bsz, process, generator=generator, device=device, **(kwargs or {})))
    if t.shape != (bsz,):
        raise ValueError(
            f"time-sampling distribution {name!r} returned shape {tuple(t.shape)}, expected ({bsz},)"
        )
    if not t.is_floating_point():
        return t.long()
    return t.to(_F64)


def training_times(
    name: str,
    kwargs: dict[str, Any],
    bsz: int,
    process: GaussianProcess,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The loss's draw of ``bsz`` training times from the distribution ``name`` with options
    ``kwargs`` (`sample_times`). ``uniform_discrete`` without options draws exactly as
    tinydiff 0.1 did (``torch.randint(1, T + 1, ...)``), so seeded training runs repeat
    bitwise."""
    if name == "uniform_discrete" and not kwargs:
        return torch.randint(
            1, process.num_timesteps + 1, (bsz,), device=device, generator=generator
        )
    return sample_times(name, bsz, process, kwargs, generator=generator, device=device)
