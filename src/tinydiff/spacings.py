"""Timestep spacings: which times a sampler visits.

Contract for a registered spacing::

    fn(num_timesteps: int, num_steps: int, alphas_cumprod: Tensor) -> Tensor  # (num_steps + 1,)

It returns the sampling times in [0, T], float64, strictly decreasing, ending exactly at 0;
fractional times are allowed (alpha_bar follows :meth:`tinydiff.DiffusionModel.alpha_bar`).
``alphas_cumprod`` (float64, (T + 1,)) lets a spacing place times by noise level.
:func:`make_timesteps` validates the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tinydiff._registry import Registry

__all__ = ["REGISTRY", "get", "make_timesteps", "names", "register"]

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
