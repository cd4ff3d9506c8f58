"""Timestep spacings: which times a sampler visits.

Contract for a registered spacing::

    fn(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor  # (num_steps + 1,)

It returns the sampling times in [0, T], float64, strictly decreasing, ending exactly at 0;
fractional times are allowed (alpha_bar follows :meth:`tinydiff.DiffusionModel.alpha_bar`).
``alphas_cumprod`` (float64, (T + 1,)) lets a spacing place times by noise level.
:func:`make_timesteps` validates the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tinydiff._registry import Registry
from tinydiff.schedules import alpha_bar_at, log_snr, time_at_log_snr

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

SpacingFn = Callable[[int, int, Tensor], Tensor]


def _check_callable(obj: Any) -> None:
    if not callable(obj):
        raise TypeError(
            f"a timestep spacing must be callable fn(num_timesteps, num_steps, alphas_cumprod), "
            f"got {obj!r}"
        )


REGISTRY: Registry[SpacingFn] = Registry("timestep spacing", _check_callable)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("trailing")
def trailing(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    """Evenly spaced integers from T down to 0: ``round(T * (S - i) / S)`` (Lin et al. 2024,
    Table 2). Starts exactly at T, so the first step sees the noise level of x_T."""
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return torch.round(num_timesteps * i / num_steps)


@register("leading")
def leading(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    """``1 + k * (T // S)`` for k = S-1..0, then 0 (DDIM, Song et al. 2021). The first time
    is below T when S does not divide T - 1."""
    stride = num_timesteps // num_steps
    t = 1 + stride * torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
    return torch.cat([t, t.new_zeros(1)])


@register("linspace")
def linspace(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    """S integers rounded from ``linspace(T, 1, S)``, then 0 (Ho et al. 2020 style)."""
    t = torch.round(torch.linspace(num_timesteps, 1, num_steps, dtype=torch.float64))
    return torch.cat([t, t.new_zeros(1)])


@register("quadratic")
def quadratic(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    """``T * ((S - i) / S) ** 2`` for i = 0..S (Song et al. 2021, DDIM's "quad" skip type):
    denser near t = 0. The times are fractional (not rounded), so they never collide; they
    start exactly at T and end exactly at 0."""
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return num_timesteps * i**2 / num_steps**2


def _log_snr_range(alphas_cumprod: Tensor) -> tuple[float, float]:
    """(log-SNR at t = 1, log-SNR at the largest time with finite SNR: T, or T - 1 under zero
    terminal SNR)."""
    lam = log_snr(alphas_cumprod.to(torch.float64))
    hi = lam[-2] if bool(torch.isneginf(lam[-1])) and lam.numel() > 2 else lam[-1]
    return float(lam[1]), float(hi)


def _times_from_log_snr(lam: Tensor, num_timesteps: int, alphas_cumprod: Tensor) -> Tensor:
    """Times of a decreasing noise ramp (log-SNR ``lam``, increasing), ends pinned to exact
    integers: the first time is T (under zero terminal SNR this replaces the ramp's first
    level, the largest finite one, by infinite noise), the last is 1; then 0 is appended."""
    t = time_at_log_snr(alphas_cumprod, lam)
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
def karras(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    r"""Times whose noise levels :math:`\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}` follow
    Karras et al. 2022, eq. 5 with rho = 7, from sigma_max = sigma(T) down to
    sigma_min = sigma(1), then t = 0. The times are fractional: the exact inverse of
    :func:`tinydiff.schedules.alpha_bar_at` (:func:`~tinydiff.schedules.time_at_log_snr`).

    Zero terminal SNR: sigma(T) is infinite, so the ramp runs from sigma(T - 1) instead and
    its first time is replaced by T: the first step goes from infinite noise to the ramp's
    second level. S = 1 gives [T, 0].
    """
    lam_lo, lam_hi = _log_snr_range(alphas_cumprod)
    sigmas = karras_sigmas(math.exp(-0.5 * lam_lo), math.exp(-0.5 * lam_hi), num_steps)
    return _times_from_log_snr(-2 * sigmas.log(), num_timesteps, alphas_cumprod)


@register("logsnr", aliases=("log_snr", "uniform_logsnr"))
def logsnr(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
    r"""Times uniform in log-SNR :math:`\lambda = \log(\bar\alpha/(1-\bar\alpha))` from
    lambda(T) up to lambda(1), then t = 0 (the "logSNR" spacing of DPM-Solver, Lu et al.
    2022). Zero terminal SNR: the ramp starts at lambda(T - 1) and its first time is replaced
    by T, as for :func:`karras`. S = 1 gives [T, 0]."""
    lam_lo, lam_hi = _log_snr_range(alphas_cumprod)
    lam = torch.linspace(lam_hi, lam_lo, num_steps, dtype=torch.float64)
    return _times_from_log_snr(lam, num_timesteps, alphas_cumprod)


@register("logsnr_trailing", aliases=("trailing_logsnr",))
def logsnr_trailing(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor:
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
    ab = alpha_bar_at(
        alphas_cumprod.to(torch.float64), torch.tensor([t1, 1.0], dtype=torch.float64)
    )
    lam_hi, lam_lo = log_snr(ab).tolist()
    lam = torch.linspace(lam_hi, lam_lo, num_steps - 1, dtype=torch.float64)
    t = time_at_log_snr(alphas_cumprod, lam)
    t[0], t[-1] = t1, 1.0
    return torch.cat([t.new_tensor([float(num_timesteps)]), t, t.new_zeros(1)])


def make_timesteps(
    spacing: str | Sequence[float] | Tensor,
    num_timesteps: int,
    num_steps: int | None,
    alphas_cumprod: Tensor,
) -> Tensor:
    """Sampling times for a spacing name or an explicit list, validated.

    Args:
        spacing: a registry name, or an explicit decreasing sequence of times in (0, T]
            (a final 0 is appended when missing).
        num_timesteps: T.
        num_steps: S, the number of steps (ignored for an explicit list).
        alphas_cumprod: float64 (T + 1,).

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
        ts = torch.as_tensor(get(spacing)(num_timesteps, num_steps, alphas_cumprod))
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
