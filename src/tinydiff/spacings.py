"""Timestep spacings: which times a sampler visits.

Contract for a registered spacing::

    fn(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor  # (num_steps + 1,)

It returns the sampling times in [0, T], float64, strictly decreasing, ending exactly at 0;
fractional times are allowed. ``process`` (:class:`tinydiff.process.GaussianProcess`) lets a
spacing place times by noise level on any process (``process.lam(t)``,
``process.time_at_lam(lam)``). :func:`make_timesteps` validates the output. A spacing written
for tinydiff 0.1, whose third parameter is named ``alphas_cumprod``, still receives the
alpha_bar table (discrete variance-preserving schedules only).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tinydiff._registry import Registry
from tinydiff.process import DiscreteVP, GaussianProcess

__all__ = [
    "REGISTRY",
    "get",
    "karras",
    "karras_sigmas",
    "logsnr",
    "make_timesteps",
    "names",
    "quadratic",
    "register",
]

SpacingFn = Callable[[int, int, GaussianProcess], Tensor]


def _check_callable(obj: Any) -> None:
    if not callable(obj):
        raise TypeError(
            f"a timestep spacing must be callable fn(num_timesteps, num_steps, process), "
            f"got {obj!r}"
        )


REGISTRY: Registry[SpacingFn] = Registry("timestep spacing", _check_callable)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("trailing")
def trailing(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    """Evenly spaced integers from T down to 0: ``round(T * (S - i) / S)`` (Lin et al. 2024,
    Table 2). Starts exactly at T, so the first step sees the noise level of x_T."""
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return torch.round(num_timesteps * i / num_steps)


@register("leading")
def leading(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    """``1 + k * (T // S)`` for k = S-1..0, then 0 (DDIM, Song et al. 2021). The first time
    is below T when S does not divide T - 1."""
    stride = num_timesteps // num_steps
    t = 1 + stride * torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
    return torch.cat([t, t.new_zeros(1)])


@register("linspace")
def linspace(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    """S integers rounded from ``linspace(T, 1, S)``, then 0 (Ho et al. 2020 style)."""
    t = torch.round(torch.linspace(num_timesteps, 1, num_steps, dtype=torch.float64))
    return torch.cat([t, t.new_zeros(1)])


@register("quadratic")
def quadratic(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    """``T * ((S - i) / S) ** 2`` for i = 0..S (Song et al. 2021, DDIM's "quad" skip type):
    denser near t = 0. The times are fractional (not rounded), so they never collide; they
    start exactly at T and end exactly at 0."""
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return num_timesteps * i**2 / num_steps**2


def _lam_range(process: GaussianProcess) -> tuple[float, float]:
    """(lambda at t = 1, lambda at the largest integer time with finite lambda: T, or T - 1
    when alpha(T) = 0)."""
    T = process.num_timesteps
    lam = process.lam(torch.tensor([1.0, T - 1.0, float(T)], dtype=torch.float64))
    hi = lam[1] if bool(torch.isneginf(lam[2])) and T > 1 else lam[2]
    return float(lam[0]), float(hi)


def _times_from_lam(lam: Tensor, num_timesteps: int, process: GaussianProcess) -> Tensor:
    """Times of a decreasing noise ramp (``lam`` increasing), ends pinned to exact integers:
    the first time is T (when alpha(T) = 0 this replaces the ramp's first level, the largest
    finite one, by infinite noise), the last is 1; then 0 is appended."""
    t = process.time_at_lam(lam)
    t[0] = float(num_timesteps)
    if t.numel() > 1:
        t[-1] = 1.0
    return torch.cat([t, t.new_zeros(1)])


def karras_sigmas(sigma_min: float, sigma_max: float, num: int, rho: float = 7.0) -> Tensor:
    r"""Karras et al. 2022 (eq. 5) noise levels, float64 (num,):
    :math:`\sigma_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{n-1}(\sigma_{min}^{1/\rho} -
    \sigma_{max}^{1/\rho}))^\rho` for i = 0..n-1 (``[sigma_max]`` for n = 1)."""
    if num == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@register("karras")
def karras(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    r"""Times whose noise levels :math:`\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}` follow
    Karras et al. 2022, eq. 5 with rho = 7, from sigma_max = sigma(T) down to
    sigma_min = sigma(1), then t = 0. The times are fractional: the exact inverse of
    :func:`tinydiff.schedules.alpha_bar_at` (:func:`~tinydiff.schedules.time_at_log_snr`).

    Zero terminal SNR: sigma(T) is infinite, so the ramp runs from sigma(T - 1) instead and
    its first time is replaced by T: the first step goes from infinite noise to the ramp's
    second level. S = 1 gives [T, 0]. On any process the Karras sigma is sigma / alpha =
    exp(-lambda).
    """
    lam_lo, lam_hi = _lam_range(process)
    sigmas = karras_sigmas(math.exp(-lam_lo), math.exp(-lam_hi), num_steps)
    return _times_from_lam(-sigmas.log(), num_timesteps, process)


@register("logsnr", aliases=("log_snr", "uniform_logsnr"))
def logsnr(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    r"""Times uniform in log-SNR :math:`\lambda = \log(\bar\alpha/(1-\bar\alpha))` from
    lambda(T) up to lambda(1), then t = 0 (the "logSNR" spacing of DPM-Solver, Lu et al.
    2022). Zero terminal SNR: the ramp starts at lambda(T - 1) and its first time is replaced
    by T, as for :func:`karras`. S = 1 gives [T, 0]."""
    lam_lo, lam_hi = _lam_range(process)
    lam = torch.linspace(lam_hi, lam_lo, num_steps, dtype=torch.float64)
    return _times_from_lam(lam, num_timesteps, process)


@register("logsnr_trailing", aliases=("trailing_logsnr",))
def logsnr_trailing(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    r"""Trailing's first step, then uniform in log-SNR: t_0 = T, t_1 = T (S - 1) / S (as
    :func:`trailing`), then t_1..t_{S-1} uniform in lambda from lambda(t_1) up to
    lambda(1), then t = 0.

    For few steps :func:`logsnr` spends steps on the extreme top of the noise range (the
    cosine schedule clips its last beta at 0.999: sigma(T) ~ 2e4 against sigma(T - 17) ~ 38),
    where the flow barely moves; here that range is crossed by one step, and the remaining
    steps are log-SNR uniform over the range that matters, ending at t = 1 as
    :func:`logsnr`. S = 1 gives [T, 0], S = 2 gives [T, 1, 0]."""
    if num_steps <= 2:
        head = [float(num_timesteps)] + [1.0] * (num_steps - 1)
        return torch.tensor([*head, 0.0], dtype=torch.float64)
    t1 = num_timesteps * (num_steps - 1) / num_steps
    lam_hi, lam_lo = process.lam(torch.tensor([t1, 1.0], dtype=torch.float64)).tolist()
    lam = torch.linspace(lam_hi, lam_lo, num_steps - 1, dtype=torch.float64)
    t = process.time_at_lam(lam)
    t[0], t[-1] = t1, 1.0
    return torch.cat([t.new_tensor([float(num_timesteps)]), t, t.new_zeros(1)])


def _call_spacing(name: str, num_timesteps: int, num_steps: int, process: GaussianProcess) -> Any:
    fn = get(name)
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) >= 3 and params[2] == "alphas_cumprod":  # the tinydiff 0.1 contract
        if not isinstance(process, DiscreteVP):
            raise ValueError(
                f"timestep spacing {name!r} takes an alphas_cumprod table (the tinydiff 0.1 "
                f"contract), which {process!r} does not have; write it as fn(num_timesteps, "
                "num_steps, process) to support every process"
            )
        return fn(num_timesteps, num_steps, process.alphas_cumprod)  # type: ignore[arg-type]
    return fn(num_timesteps, num_steps, process)


def make_timesteps(
    spacing: str | Sequence[float] | Tensor,
    num_timesteps: int,
    num_steps: int | None,
    process: GaussianProcess | Tensor,
) -> Tensor:
    """Sampling times for a spacing name or an explicit list, validated.

    Args:
        spacing: a registry name, or an explicit decreasing sequence of times in (0, T]
            (a final 0 is appended when missing).
        num_timesteps: T.
        num_steps: S, the number of steps (ignored for an explicit list).
        process: the model's process (an alpha_bar table (T + 1,) is accepted too).

    Returns:
        float64 tensor (S + 1,), strictly decreasing, from at most T down to exactly 0.

    Raises:
        ValueError: the times are out of range, not strictly decreasing, or repeat.
    """
    if isinstance(spacing, str):
        if num_steps is None or not 1 <= num_steps <= num_timesteps:
            raise ValueError(
                f"sampling_timesteps must be an int in 1..{num_timesteps}, got {num_steps!r}"
            )
        where = f"timestep spacing {spacing!r}"
        if isinstance(process, Tensor):
            process = DiscreteVP(process)
        ts = torch.as_tensor(_call_spacing(spacing, num_timesteps, num_steps, process))
        ts = ts.detach().to("cpu", torch.float64).flatten()
        if ts.numel() != num_steps + 1:
            raise ValueError(f"{where} returned {ts.numel()} times, expected {num_steps + 1}")
    else:
        where = "the explicit timestep list"
        ts = torch.as_tensor(spacing, dtype=torch.float64).flatten().cpu()
        if ts.numel() == 0:
            raise ValueError("an explicit timestep list must not be empty")
        if ts[-1] != 0:
            ts = torch.cat([ts, ts.new_zeros(1)])
    if not torch.isfinite(ts).all() or ts.max() > num_timesteps or ts.min() < 0:
        raise ValueError(f"{where} gave times outside [0, {num_timesteps}]: {ts.tolist()}")
    if ts[-1] != 0:
        raise ValueError(f"{where} must end at t = 0, got {ts.tolist()}")
    if ts.numel() < 2 or (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"{where} must give strictly decreasing times, got {ts.tolist()}")
    return ts
