r"""Noise schedules: the Gaussian process :math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\epsilon`.

Two kinds of entries share one registry, and :func:`build_process` turns either into a
:class:`tinydiff.process.GaussianProcess`:

* **discrete variance-preserving tables** (DDPM, Ho et al. 2020): :math:`\bar\alpha_t` for
  :math:`t = 0, \dots, T`, with :math:`\alpha = \sqrt{\bar\alpha}`,
  :math:`\sigma = \sqrt{1-\bar\alpha}` (:class:`~tinydiff.process.DiscreteVP`);
* **continuous paths**, functions of :math:`s = t/T \in [0, 1]` returning (alpha, sigma)
  (:class:`~tinydiff.process.ContinuousProcess`), registered with :func:`register_path`.

Contract for a registered table schedule::

    fn(num_timesteps: int, **schedule_kwargs) -> Tensor  # shape (T + 1,)

The tensor holds :math:`\bar\alpha_t` for t = 0..T: finite, strictly decreasing, in (0, 1].
Built-in schedules return 1 at t = 0 (clean data). Every table is converted to float64 and
checked by :func:`build_alphas_cumprod` when it is used; ``zero_terminal_snr`` rescales any
schedule so that :math:`\bar\alpha_T = 0` (Lin et al. 2024).

Register your own::

    @tinydiff.schedules.register("my_schedule")
    def my_schedule(num_timesteps: int) -> torch.Tensor: ...   # alpha_bar, (T + 1,)

    @tinydiff.schedules.register_path("cos_path")
    def cos_path(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # s in [0, 1]
        return torch.cos(torch.pi * s / 2), torch.sin(torch.pi * s / 2)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tinydiff._registry import Registry, check_kwargs
from tinydiff.process import ContinuousProcess, DiscreteVP, GaussianProcess

__all__ = [
    "REGISTRY",
    "PathSpec",
    "alpha_bar_at",
    "build_alphas_cumprod",
    "build_process",
    "check_schedule_kwargs",
    "default_time_sampling",
    "edm",
    "explicit_betas",
    "get",
    "is_path",
    "log_snr",
    "names",
    "rectified_flow",
    "register",
    "register_path",
    "rescale_zero_terminal_snr",
    "time_at_log_snr",
]

ScheduleFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class PathSpec:
    """A registered continuous path (see :func:`register_path`).

    Attributes:
        fn: ``fn(s, **kwargs) -> (alpha, sigma)`` for s in [0, 1] (float64 tensors).
        inverse: optional closed form ``(lam, **kwargs) -> s`` of lambda = log(alpha / sigma).
        variance_preserving: alpha^2 + sigma^2 = 1 (checked when the process is built).
        time_sampling: the default training-time distribution (:mod:`tinydiff.time_sampling`).
        time_sampling_kwargs: its default options.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    inverse: Callable[..., torch.Tensor] | None = None
    variance_preserving: bool = False
    time_sampling: str = "uniform"
    time_sampling_kwargs: Mapping[str, Any] | None = None

    def __call__(self, s: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(s, **kwargs)


def _check_callable(obj: Any) -> None:
    if not callable(obj):
        raise TypeError(
            f"a noise schedule must be callable fn(num_timesteps, **kwargs) (a VP table) or a "
            f"path registered with register_path, got {obj!r}"
        )


REGISTRY: Registry[ScheduleFn | PathSpec] = Registry("noise schedule", _check_callable)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def register_path(
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    override: bool = False,
    inverse: Callable[..., torch.Tensor] | None = None,
    variance_preserving: bool = False,
    time_sampling: str = "uniform",
    time_sampling_kwargs: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a continuous Gaussian path ``fn(s, **kwargs) -> (alpha, sigma)``.

    ``s = t / T`` is a float64 tensor in [0, 1]; return float64 tensors of its shape (or
    scalars), written with torch operations so that derivatives come from autograd. lambda =
    log(alpha / sigma) must decrease strictly in s. The decorated function is returned
    unchanged; the registry holds a :class:`PathSpec`.

    Args:
        name: registry name (used as ``noise_schedule_type``).
        aliases: other names.
        override: replace an existing entry.
        inverse: optional closed-form ``(lam, **kwargs) -> s`` (else bisection).
        variance_preserving: declare alpha^2 + sigma^2 = 1.
        time_sampling: the training-time distribution the path defaults to (a name in
            :mod:`tinydiff.time_sampling`; ``"uniform"``: t uniform on (0, T]).
        time_sampling_kwargs: that distribution's default options.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = PathSpec(
            fn,
            inverse,
            variance_preserving,
            time_sampling,
            None if time_sampling_kwargs is None else dict(time_sampling_kwargs),
        )
        REGISTRY.register(name, aliases=aliases, override=override)(spec)
        return fn

    return deco


def default_time_sampling(name: str) -> tuple[str, dict[str, Any]]:
    """The training-time distribution a schedule defaults to, with its options:
    ``uniform_discrete`` (integers 1..T) for a discrete VP table, the registered default for
    a path."""
    entry = get(name)
    if isinstance(entry, PathSpec):
        return entry.time_sampling, dict(entry.time_sampling_kwargs or {})
    return "uniform_discrete", {}


def is_path(name: str) -> bool:
    """Whether the schedule ``name`` is a continuous path (else a discrete VP table)."""
    return isinstance(get(name), PathSpec)


def check_schedule_kwargs(name: str, num_timesteps: int, kwargs: Mapping[str, Any]) -> None:
    """Raise TypeError if the schedule would not accept ``kwargs``."""
    entry = get(name)
    if isinstance(entry, PathSpec):
        check_kwargs("noise schedule", name, entry.fn, None, **kwargs)
    else:
        check_kwargs("noise schedule", name, entry, num_timesteps, **kwargs)


def build_process(
    schedule: str,
    num_timesteps: int,
    schedule_kwargs: Mapping[str, Any] | None = None,
    *,
    zero_terminal_snr: bool = False,
) -> GaussianProcess:
    """The process of a registered schedule: a :class:`~tinydiff.process.DiscreteVP` for a
    table, a :class:`~tinydiff.process.ContinuousProcess` for a path.

    Raises:
        ValueError: bad table or path values (see :func:`build_alphas_cumprod`); zero terminal
            SNR on a continuous path (define alpha(1) = 0 in the path instead).
        TypeError: the schedule rejected its options.
    """
    entry = get(schedule)
    if isinstance(entry, PathSpec):
        if zero_terminal_snr:
            raise ValueError(
                f"zero_terminal_snr=True rescales discrete VP tables; noise schedule "
                f"{schedule!r} is a continuous path: give it alpha(1) = 0 instead"
            )
        return ContinuousProcess(
            entry.fn,
            num_timesteps,
            dict(schedule_kwargs or {}),
            name=schedule,
            inverse=entry.inverse,
            variance_preserving=entry.variance_preserving,
        )
    table = build_alphas_cumprod(
        schedule, num_timesteps, schedule_kwargs, zero_terminal_snr=zero_terminal_snr
    )
    return DiscreteVP(table)


def _check_betas(name: str, beta_start: float, beta_end: float) -> None:
    """Betas that rise monotonically inside (0, 1): 0 < beta_start <= beta_end < 1."""
    for arg, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{name} {arg} must be a number in (0, 1), got {v!r}")
    if beta_start > beta_end:
        raise ValueError(
            f"{name} needs beta_start <= beta_end (noise that grows with t), got beta_start="
            f"{beta_start} > beta_end={beta_end}; swap them"
        )


def _from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar for t = 0..T from betas for t = 1..T (alpha_bar_0 = 1)."""
    return torch.cat([betas.new_ones(1), torch.cumprod(1.0 - betas, dim=0)])


@register("linear")
def linear(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, rescale: bool = True
) -> torch.Tensor:
    """DDPM's linear betas (Ho et al. 2020), 1e-4 to 0.02 at T = 1000, scaled by 1000 / T
    (Nichol & Dhariwal 2021) so that any T gives about the same total noise; ``rescale=False``
    uses beta_start and beta_end as given for every T (diffusers' convention)."""
    _check_betas("linear", beta_start, beta_end)
    scale = 1000.0 / num_timesteps if rescale else 1.0
    betas = torch.linspace(
        beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64
    ).clamp(max=0.999)
    return _from_betas(betas)


@register("scaled_linear")
def scaled_linear(
    num_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale: bool = True,
) -> torch.Tensor:
    """Betas linear in their square root (Stable Diffusion, Rombach et al. 2022), scaled by
    1000 / T like ``linear`` (``rescale=False``: as given for every T)."""
    _check_betas("scaled_linear", beta_start, beta_end)
    scale = 1000.0 / num_timesteps if rescale else 1.0
    betas = (
        torch.linspace(
            math.sqrt(beta_start * scale),
            math.sqrt(beta_end * scale),
            num_timesteps,
            dtype=torch.float64,
        )
        ** 2
    ).clamp(max=0.999)
    return _from_betas(betas)


@register("cosine", aliases=("squaredcos_cap_v2",))
def cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    r"""Cosine schedule (Nichol & Dhariwal 2021): :math:`\bar\alpha_t = f(t)/f(0)`,
    :math:`f(t) = \cos^2\!\big(\frac{t/T + s}{1 + s}\,\frac{\pi}{2}\big)`, betas clipped at
    ``max_beta``."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < math.inf:
        raise ValueError(f"cosine s (the offset at t = 0) must be a finite number >= 0, got {s!r}")
    if isinstance(max_beta, bool) or not isinstance(max_beta, (int, float)) or not 0 < max_beta < 1:
        raise ValueError(f"cosine max_beta must be a number in (0, 1), got {max_beta!r}")
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _from_betas(betas)


@register("sigmoid")
def sigmoid(
    num_timesteps: int,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> torch.Tensor:
    r"""Sigmoid schedule (Chen 2023, "On the importance of noise scheduling"):
    :math:`\bar\alpha_t \propto \sigma(-(\tfrac{t}{T}(e - s) + s)/\tau)`, normalised to 1 at
    t = 0 and 0 at t = T, with betas clipped at ``max_beta``."""
    if not start < end:
        raise ValueError(f"sigmoid schedule needs start < end, got start={start}, end={end}")
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    f = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _from_betas(betas)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    r"""Rescale a schedule so that the terminal SNR is exactly zero (Lin et al. 2024, Alg. 1).

    :math:`\sqrt{\bar\alpha_t}` for t = 1..T is shifted so that its last value is 0 and scaled
    so that its first value (t = 1) is unchanged; t = 0 keeps its value.

    Args:
        alphas_cumprod: float64 tensor (T + 1,), strictly decreasing.

    Returns:
        float64 tensor (T + 1,) with ``[-1] == 0``.
    """
    if alphas_cumprod.numel() < 3:
        raise ValueError(
            "zero_terminal_snr needs num_timesteps of at least 2: it keeps alpha_bar_1 and sets "
            "alpha_bar_T to 0"
        )
    sqrt_ab = alphas_cumprod[1:].sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return torch.cat([alphas_cumprod[:1], sqrt_ab**2])


def build_alphas_cumprod(
    schedule: str,
    num_timesteps: int,
    schedule_kwargs: Mapping[str, Any] | None = None,
    *,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Evaluate a registered schedule, check its output, and optionally rescale it.

    Args:
        schedule: registry name.
        num_timesteps: T.
        schedule_kwargs: keyword options forwarded to the schedule function.
        zero_terminal_snr: rescale so that alpha_bar_T = 0 (Lin et al. 2024).

    Returns:
        float64 tensor (T + 1,): alpha_bar for t = 0..T.

    Raises:
        ValueError: the schedule returned the wrong length, NaN/inf, values outside (0, 1], or
            a table that is not strictly decreasing.
        TypeError: the schedule did not return a tensor-like, or rejected the kwargs.
    """
    fn = get(schedule)
    if isinstance(fn, PathSpec):
        raise ValueError(
            f"noise schedule {schedule!r} is a continuous path, not an alpha_bar table; use "
            "build_process (or model.process) for its alpha(t) and sigma(t)"
        )
    kwargs = dict(schedule_kwargs or {})
    try:
        out = fn(num_timesteps, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"noise schedule {schedule!r} rejected its arguments (num_timesteps={num_timesteps}, "
            f"schedule_kwargs={kwargs}): {err}"
        ) from err
    try:
        table = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"noise schedule {schedule!r} must return a tensor of alpha_bar values, "
            f"got {type(out).__name__}"
        ) from err
    where = f"noise schedule {schedule!r} (num_timesteps={num_timesteps})"
    if table.numel() != num_timesteps + 1:
        raise ValueError(
            f"{where} returned {table.numel()} values; expected num_timesteps + 1 = "
            f"{num_timesteps + 1} (alpha_bar for t = 0..T)"
        )
    if not torch.isfinite(table).all():
        raise ValueError(f"{where} returned NaN or inf values")
    if (table <= 0).any() or (table > 1).any():
        bad = table[(table <= 0) | (table > 1)][0].item()
        raise ValueError(f"{where} returned alpha_bar = {bad!r}; every value must lie in (0, 1]")
    diffs = table[1:] - table[:-1]
    if (diffs >= 0).any():
        i = int(torch.nonzero(diffs >= 0)[0].item())
        raise ValueError(
            f"{where} is not strictly decreasing: alpha_bar[{i}] = {table[i].item():.6g} <= "
            f"alpha_bar[{i + 1}] = {table[i + 1].item():.6g}"
        )
    if zero_terminal_snr:
        table = rescale_zero_terminal_snr(table)
    return table


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"tinydiff.schedules.{old} is deprecated and will be removed in tinydiff 1.0; use {new} "
        "(tinydiff.process; lambda = log(alpha / sigma) is half the log-SNR)",
        DeprecationWarning,
        stacklevel=3,
    )


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    r"""Deprecated: the full log-SNR :math:`\log(\bar\alpha / (1 - \bar\alpha)) = 2\lambda`
    (+inf at alpha_bar = 1, -inf at alpha_bar = 0).

    Use ``2 * process.lam(t)`` of a `tinydiff.process.GaussianProcess` instead.
    """
    _deprecated("log_snr", "2 * process.lam(t)")
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deprecated: alpha_bar at real times t in [0, T] on an interpolated table, float64.

    Use ``DiscreteVP(alphas_cumprod).alpha_bar(t)`` (`tinydiff.process.DiscreteVP`
    documents the interpolation).

    Raises:
        ValueError: a time outside [0, T].
    """
    _deprecated("alpha_bar_at", "DiscreteVP(alphas_cumprod).alpha_bar(t)")
    return DiscreteVP(alphas_cumprod).alpha_bar(t)


def time_at_log_snr(alphas_cumprod: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Deprecated: the real time t in [0, T] whose FULL log-SNR log(alpha_bar / (1 - alpha_bar))
    is ``lam``, the inverse of `alpha_bar_at`, float64, lam's shape.

    Use ``DiscreteVP(alphas_cumprod).time_at_lam(lam / 2)`` (lambda is half the log-SNR).

    Raises:
        ValueError: a value outside the schedule's range, or NaN.
    """
    _deprecated("time_at_log_snr", "DiscreteVP(alphas_cumprod).time_at_lam(lam / 2)")
    return DiscreteVP(alphas_cumprod).time_at_lam(torch.as_tensor(lam, dtype=torch.float64) / 2)


# -- explicit tables (diffusers' ``trained_betas``) ----------------------------------------------


@register("betas", aliases=("trained_betas",))
def explicit_betas(num_timesteps: int, betas: Sequence[float] | None = None) -> torch.Tensor:
    r"""A schedule given by its T betas for t = 1..T: :math:`\bar\alpha_t = \prod_{s \le t}
    (1 - \beta_s)` in float64 (diffusers' ``trained_betas``).

    Args:
        num_timesteps: T; must equal ``len(betas)``.
        betas: T values in (0, 1). None (the default, so that every registered schedule
            works with its defaults) gives DDPM's linear betas, 1e-4 to 0.02 for any T.
    """
    if betas is None:
        return linear(num_timesteps, rescale=False)  # type: ignore[return-value, arg-type]
    table = torch.as_tensor(list(betas), dtype=torch.float64).flatten()
    if table.numel() != num_timesteps:
        raise ValueError(
            f"the 'betas' schedule got {table.numel()} betas for num_timesteps={num_timesteps}; "
            "pass schedule_kwargs={'betas': [...]} with exactly num_timesteps values (t = 1..T)"
        )
    if not torch.isfinite(table).all() or (table <= 0).any() or (table >= 1).any():
        raise ValueError(
            "every beta of the 'betas' schedule must be a finite number in (0, 1); got "
            f"min {table.min().item():.6g}, max {table.max().item():.6g}"
        )
    return _from_betas(table)


# -- continuous paths ---------------------------------------------------------------------------


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"rectified_flow shift must be a number > 0, got {shift!r}")
    return float(shift)


def shift_time(s: torch.Tensor, shift: float) -> torch.Tensor:
    r"""The SD3 time shift (Esser et al. 2024, eq. 23): :math:`s' = \frac{m s}{1 + (m - 1) s}`
    with m = ``shift``; m = 1 is the identity, m > 1 spends more time at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def _rectified_flow_inverse(lam: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    # lambda = log((1 - s') / s')  =>  s' = sigmoid(-lambda); unshift: s = s' / (m - (m - 1) s')
    shifted = torch.sigmoid(-lam)
    return shifted / (shift - (shift - 1) * shifted)


@register_path(
    "rectified_flow",
    aliases=("flow_matching", "flow"),
    inverse=_rectified_flow_inverse,
    time_sampling="logit_normal",
)
def rectified_flow(s: torch.Tensor, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; Esser et al.
    2024): :math:`\alpha = 1 - s'`, :math:`\sigma = s'` with the SD3 shift
    :math:`s' = \frac{m s}{1 + (m - 1)s}` (:func:`shift_time`, m = ``shift``, default 1).

    The shift lives in the path, so sampling, spacings and training all see it exactly once.
    alpha(1) = 0: the process starts from pure noise (lambda(T) = -inf). Default training
    times: logit-normal (SD3, m = 0, s = 1).
    """
    m = _check_shift(shift)
    sp = shift_time(s, m)
    return 1 - sp, sp


def _check_edm(sigma_min: float, sigma_max: float, rho: float) -> None:
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"edm {name} must be a finite number > 0, got {v!r}")
    if not sigma_min < sigma_max:
        raise ValueError(
            f"edm needs sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _edm_inverse(
    lam: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (torch.exp(-lam / rho) - lo) / (hi - lo)


@register_path(
    "edm",
    aliases=("karras_ve",),
    inverse=_edm_inverse,
    time_sampling="log_normal",
)
def edm(
    s: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""EDM's variance-exploding path (Karras et al. 2022): :math:`\alpha = 1` and

    .. math::
        \sigma(s) = \big(\sigma_{min}^{1/\rho} + s\,(\sigma_{max}^{1/\rho} - \sigma_{min}^{1/\rho})\big)^\rho,

    so t = 0 is sigma_min (not 0) and t = T is sigma_max, and evenly spaced times
    (``trailing`` spacing) are exactly Karras et al.'s eq. 5 noise levels. The last sampling
    step ends at sigma_min > 0 (an ordinary step; the sample keeps noise of std sigma_min =
    0.002). The initial noise has std sqrt(1 + sigma_max^2)
    (:meth:`~tinydiff.process.GaussianProcess.prior_std`). Default training times:
    log-normal in sigma (ln sigma ~ N(-1.2, 1.2^2), clamped to [sigma_min, sigma_max]).
    """
    _check_edm(sigma_min, sigma_max, rho)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigma = (lo + s * (hi - lo)) ** rho
    return torch.ones_like(sigma), sigma
