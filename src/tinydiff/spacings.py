"""Timestep spacings: which times a sampler visits.

Contract for a registered spacing::

    fn(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor  # (num_steps + 1,)

It returns the sampling times in [0, T], float64, strictly decreasing, ending exactly at 0;
fractional times are allowed. ``process`` (:class:`tinydiff.process.GaussianProcess`) lets a
spacing place times by noise level on any process (``process.lam(t)``,
``process.time_at_lam(lam)``, with lambda = log(alpha / sigma), half the log-SNR). A spacing
written for tinydiff 0.1 (third parameter ``alphas_cumprod``) is adapted when it is
registered (`tinydiff.compat`).

`resolve` is the one place where a spacing (a name, explicit times, or None for a
sampler's default) becomes sampling times: every rule about names, explicit times and the
number of steps is checked there (`explicit_times` is its process-free part, for
configs). The spacings that ramp in noise level end at ``max(process.t_min, 1)``
(`tinydiff.process.GaussianProcess.t_min`, the smallest trained time; at least one time
unit, so that the ramp stays at finite lambda on paths with sigma(0) = 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tinydiff._registry import Registry
from tinydiff.process import DiscreteVP, GaussianProcess

__all__ = [
    "REGISTRY",
    "check_spec",
    "explicit_times",
    "get",
    "karras",
    "karras_sigmas",
    "logsnr",
    "make_timesteps",
    "names",
    "quadratic",
    "ramp_end",
    "register",
    "resolve",
    "uniform",
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


@register("uniform")
def uniform(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    """Evenly spaced times ``T * (S - i) / S``, not rounded: the uniform grid of flow
    matching's Euler on ``rectified_flow``, and exactly Karras et al.'s eq. 5 levels on
    ``edm`` (diffusers' FlowMatch and EDM schedulers use fractional times too)."""
    i = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return num_timesteps * i / num_steps


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


def ramp_end(process: GaussianProcess) -> float:
    """The least noisy time of a noise-level ramp (before the final t = 0):
    ``max(process.t_min, 1)``, the smallest trained time but at least t = 1."""
    return max(process.t_min, 1.0)


def _lam_range(process: GaussianProcess) -> tuple[float, float]:
    """(lambda at `ramp_end`, lambda at the largest integer time with finite lambda: T,
    or T - 1 when alpha(T) = 0)."""
    T = process.num_timesteps
    lam = process.lam(torch.tensor([ramp_end(process), T - 1.0, float(T)], dtype=torch.float64))
    hi = lam[1] if bool(torch.isneginf(lam[2])) and T > 1 else lam[2]
    return float(lam[0]), float(hi)


def _times_from_lam(lam: Tensor, num_timesteps: int, process: GaussianProcess) -> Tensor:
    """Times of a decreasing noise ramp (``lam`` increasing), ends pinned to exact times:
    the first time is T (when alpha(T) = 0 this replaces the ramp's first level, the largest
    finite one, by infinite noise), the last is `ramp_end`; then 0 is appended."""
    t = process.time_at_lam(lam)
    t[0] = float(num_timesteps)
    if t.numel() > 1:
        t[-1] = ramp_end(process)
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
    r"""Times whose noise levels :math:`\hat\sigma = \sigma/\alpha = e^{-\lambda}`
    (:math:`\sqrt{(1-\bar\alpha)/\bar\alpha}` on a VP table) follow Karras et al. 2022, eq. 5
    with rho = 7, from sigma_max = sigma_hat(T) down to sigma_min = sigma_hat(t_end), then
    t = 0, where t_end = `ramp_end` (t = 1 on the built-in processes). The times are
    fractional: the exact inverse `tinydiff.process.GaussianProcess.time_at_lam`.

    Zero terminal SNR: sigma(T) is infinite, so the ramp runs from sigma(T - 1) instead and
    its first time is replaced by T: the first step goes from infinite noise to the ramp's
    second level. S = 1 gives [T, 0].
    """
    lam_lo, lam_hi = _lam_range(process)
    sigmas = karras_sigmas(math.exp(-lam_lo), math.exp(-lam_hi), num_steps)
    return _times_from_lam(-sigmas.log(), num_timesteps, process)


@register("logsnr", aliases=("log_snr", "uniform_logsnr"))
def logsnr(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    r"""Times uniform in :math:`\lambda = \log(\alpha/\sigma)` (half the log-SNR; uniform in
    lambda is uniform in log-SNR) from lambda(T) up to lambda(t_end), t_end = `ramp_end`
    (t = 1 on the built-in processes), then t = 0 (the "logSNR" spacing of DPM-Solver, Lu et
    al. 2022). Zero terminal SNR: the ramp starts at lambda(T - 1) and its first time is replaced
    by T, as for :func:`karras`. S = 1 gives [T, 0]."""
    lam_lo, lam_hi = _lam_range(process)
    lam = torch.linspace(lam_hi, lam_lo, num_steps, dtype=torch.float64)
    return _times_from_lam(lam, num_timesteps, process)


@register("logsnr_trailing", aliases=("trailing_logsnr",))
def logsnr_trailing(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
    r"""Trailing's first step, then uniform in log-SNR: t_0 = T, t_1 = T (S - 1) / S (as
    `trailing`), then t_1..t_{S-1} uniform in lambda = log(alpha / sigma) from
    lambda(t_1) up to lambda(t_end), t_end = `ramp_end`, then t = 0.

    For few steps :func:`logsnr` spends steps on the extreme top of the noise range (the
    cosine schedule clips its last beta at 0.999: sigma(T) ~ 2e4 against sigma(T - 17) ~ 38),
    where the flow barely moves; here that range is crossed by one step, and the remaining
    steps are log-SNR uniform over the range that matters, ending at t_end as
    `logsnr`. S = 1 gives [T, 0], S = 2 gives [T, t_end, 0]."""
    end = ramp_end(process)
    if num_steps <= 2:
        head = [float(num_timesteps)] + [end] * (num_steps - 1)
        return torch.tensor([*head, 0.0], dtype=torch.float64)
    t1 = num_timesteps * (num_steps - 1) / num_steps
    lam_hi, lam_lo = process.lam(torch.tensor([t1, end], dtype=torch.float64)).tolist()
    lam = torch.linspace(lam_hi, lam_lo, num_steps - 1, dtype=torch.float64)
    t = process.time_at_lam(lam)
    t[0], t[-1] = t1, end
    return torch.cat([t.new_tensor([float(num_timesteps)]), t, t.new_zeros(1)])


def check_spec(spec: Any) -> None:
    """Raise unless ``spec`` is None, a name (str) or explicit times of the right kind: a
    sequence of real numbers (bools refused) or a real 1-d tensor.

    Raises:
        TypeError: another type, a non-number in the sequence, a bool or complex tensor.
        ValueError: a tensor that is not 1-d.
    """
    if spec is None or isinstance(spec, str):
        return
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool or spec.is_complex():
            raise TypeError(
                f"explicit timestep_spacing times must be real numbers, got a {spec.dtype} "
                "tensor; pass e.g. torch.tensor([999.0, 500.0, 0.0])"
            )
        if spec.dim() != 1:
            raise ValueError(
                f"explicit timestep_spacing times must be a 1-d tensor (S + 1,), got shape "
                f"{tuple(spec.shape)}"
            )
        return
    if not isinstance(spec, Sequence):
        raise TypeError(
            "timestep_spacing must be a spacing name, a sequence of times or a tensor, got "
            f"{type(spec).__name__}"
        )
    bad = [v for v in spec if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise TypeError(
            f"an explicit timestep_spacing must hold numbers (decreasing times ending at 0), "
            f"got {bad[0]!r} ({type(bad[0]).__name__}); e.g. [999, 500, 0]"
        )


def _check_times(ts: Tensor, where: str, num_timesteps: int) -> Tensor:
    if not torch.isfinite(ts).all() or ts.max() > num_timesteps or ts.min() < 0:
        raise ValueError(f"{where} gave times outside [0, {num_timesteps}]: {ts.tolist()}")
    if ts[-1] != 0:
        raise ValueError(f"{where} must end at t = 0, got {ts.tolist()}")
    if ts.numel() < 2 or (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"{where} must give strictly decreasing times, got {ts.tolist()}")
    return ts


def explicit_times(times: Sequence[float] | Tensor, num_timesteps: int) -> Tensor:
    """Explicit sampling times, checked without a process (what a config can check).

    Args:
        times: real, finite, strictly decreasing times in [0, T], a sequence or a 1-d tensor;
            a final 0 is appended when missing.
        num_timesteps: T.

    Returns:
        float64 CPU tensor (S + 1,), strictly decreasing, ending exactly at 0.

    Raises:
        TypeError: not numbers, or a bool / complex tensor (`check_spec`).
        ValueError: empty, not 1-d, outside [0, T], NaN/inf, or not strictly decreasing.
    """
    if times is None or isinstance(times, str):
        raise TypeError(f"explicit times must be a sequence or a tensor, got {times!r}")
    if not isinstance(times, (Tensor, Sequence)) and hasattr(times, "__array__"):
        times = torch.as_tensor(times)  # a NumPy array
    check_spec(times)
    if isinstance(times, Tensor):
        ts = times.detach().to("cpu", torch.float64)
    else:
        ts = torch.tensor([float(v) for v in times], dtype=torch.float64)
    if ts.numel() == 0:
        raise ValueError("an explicit timestep list must not be empty")
    if ts[-1] != 0:
        ts = torch.cat([ts, ts.new_zeros(1)])
    return _check_times(ts, "the explicit timestep list", num_timesteps)


def _named(
    name: str, num_timesteps: int, num_steps: int | None, process: GaussianProcess
) -> Tensor:
    if num_steps is None or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling_timesteps must be an int in 1..{num_timesteps}, got {num_steps!r}"
        )
    ts = torch.as_tensor(get(name)(num_timesteps, num_steps, process))
    ts = ts.detach().to("cpu", torch.float64).flatten()
    where = f"timestep spacing {name!r}"
    if ts.numel() != num_steps + 1:
        raise ValueError(f"{where} returned {ts.numel()} times, expected {num_steps + 1}")
    return _check_times(ts, where, num_timesteps)


def resolve(
    spec: str | Sequence[float] | Tensor | None,
    process: GaussianProcess,
    num_steps: int | None = None,
    default_spacing: str = "trailing",
    *,
    start_given: bool = True,
) -> Tensor:
    """The sampling times of a spacing: the one validator of spacing names and explicit times.

    Args:
        spec: a registered name (unknown names are answered with close matches), explicit
            times (see `explicit_times`), or None for ``default_spacing``.
        process: the process the times are for (T = ``process.num_timesteps``).
        num_steps: S, the number of steps (``sampling_timesteps``): in 1..T for a name
            (None: T); for explicit times None or their count.
        default_spacing: the spacing used when ``spec`` is None: a sampler's
            ``default_spacing`` (e.g. ``tinydiff.samplers.get(name).default_spacing``).
        start_given: whether the caller has the sample at the first time (``init_noise`` or
            an editing start). Explicit times that start below T without it draw x_T as pure
            noise at the wrong noise level: a FutureWarning in 0.3, an error in 0.4. Named
            spacings (``leading`` starts below T by design) are unaffected.

    Returns:
        float64 CPU tensor (S + 1,), strictly decreasing, from at most T down to exactly 0.

    Raises:
        TypeError: ``num_steps`` not an int (bools refused), or ``spec`` of the wrong kind.
        ValueError: an unknown name, S outside 1..T, explicit times that are out of range,
            not 1-d, not strictly decreasing, or whose count differs from ``num_steps``.
    """
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)):
        raise TypeError(f"sampling_timesteps must be an int, got {num_steps!r}")
    T = process.num_timesteps
    if spec is None:
        spec = default_spacing
    if isinstance(spec, str):
        return _named(spec, T, T if num_steps is None else num_steps, process)
    times = explicit_times(spec, T)
    if num_steps is not None and num_steps != times.numel() - 1:
        raise ValueError(
            f"the explicit timestep list has {times.numel() - 1} steps but "
            f"sampling_timesteps={num_steps}; pass sampling_timesteps="
            f"{times.numel() - 1} (or None), or a spacing name"
        )
    if not start_given and float(times[0]) < T:
        warnings.warn(
            f"the explicit times start at t = {float(times[0]):g} < T = {T}, but the initial "
            "sample is drawn as pure noise (the level of t = T); pass init_noise (the sample at "
            f"t = {float(times[0]):g}, e.g. alpha(t) x + sigma(t) z) or start the times at T. "
            "This will be an error in tinydiff 0.4",
            FutureWarning,
            stacklevel=3,
        )
    return times


def make_timesteps(
    spacing: str | Sequence[float] | Tensor,
    num_timesteps: int,
    num_steps: int | None,
    process: GaussianProcess | Tensor,
) -> Tensor:
    """Sampling times for a spacing name or an explicit list, validated (see `resolve`,
    which takes the process alone).

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
        if isinstance(process, Tensor):
            process = DiscreteVP(process)
        return _named(spacing, num_timesteps, num_steps, process)
    return explicit_times(spacing, num_timesteps)
