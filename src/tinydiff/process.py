r"""The Gaussian process behind every component: :math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\epsilon`.

One :class:`GaussianProcess` answers, in float64 and at any real network time t in [0, T]
(T = ``num_timesteps``; the network contract ``net(x_t, t)`` is the same for every process):

* :math:`\alpha(t)`, :math:`\sigma(t)` and their derivatives in :math:`s = t/T`;
* the half log-SNR :math:`\lambda(t) = \log(\alpha/\sigma)` (+inf where sigma = 0, -inf where
  alpha = 0) and its one inverse :math:`t(\lambda)` (`GaussianProcess.time_at_lam`);
  "lambda" and ``lam`` mean this half log-SNR everywhere in tinydiff (the full log-SNR
  :math:`\log(\alpha^2/\sigma^2)` is :math:`2\lambda`);
* `GaussianProcess.t_min`, the smallest trained time, where samplers and spacings stop
  asking the network for a less noisy level.

Samplers, spacings, the loss and the likelihood read the process only; nothing else knows
whether it came from a discrete variance-preserving table (:class:`DiscreteVP`, DDPM-style:
:math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1-\bar\alpha}`) or from continuous
functions of s (:class:`ContinuousProcess`: a cosine VP path, rectified flow, EDM ...).
Data flows one way: config -> process -> sampling plan -> loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "POINT_FIELDS",
    "ContinuousProcess",
    "DiscreteVP",
    "GaussianProcess",
    "PathValues",
    "Point",
    "vp_point",
]

#: the entries of a process point (the last dim of :meth:`GaussianProcess.points`)
POINT_FIELDS = ("t", "alpha", "sigma", "d_alpha", "d_sigma")

_F64 = torch.float64
_V = TypeVar("_V")


class PathValues(NamedTuple):
    r"""A process evaluated at the sampling times: what :meth:`Sampler.plan` receives.

    Attributes:
        t: float64 (S + 1,), strictly decreasing network times, ``t[-1] == 0``.
        alpha: :math:`\alpha(t)`, float64 (S + 1,).
        sigma: :math:`\sigma(t)`, float64 (S + 1,).
        lam: :math:`\lambda(t) = \log(\alpha/\sigma)`, float64 (S + 1,), +-inf at the ends
            where sigma or alpha is 0.
        process: the process itself (for times a sampler adds, e.g. Heun's churn).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    process: GaussianProcess


def _log_ratio(alpha: Tensor, sigma: Tensor) -> Tensor:
    return torch.log(alpha) - torch.log(sigma)


class GaussianProcess:
    """Base class: subclasses implement :meth:`alpha_sigma`; the rest follows from it.

    Args:
        num_timesteps: T, the network-time scale (times lie in [0, T]).

    Attributes:
        num_timesteps: T.
        variance_preserving: whether alpha^2 + sigma^2 = 1 at every time.
    """

    variance_preserving: bool = False

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)

    @property
    def t_min(self) -> float:
        """The smallest trained time: the least noisy level the network has learnt.

        0 on a continuous path (trained at real times in (0, T]); a discrete table overrides
        it with 1 (`DiscreteVP`: its training times are the integers 1..T). Heun's
        last node is kept at or above it, the noise-level spacings end at
        ``max(t_min, 1)`` (`tinydiff.spacings`), and
        `tinydiff.timestep_search.optimize_timesteps` searches no lower by default.
        """
        return 0.0

    def on_device(
        self, key: str, device: torch.device | str, build: Callable[[torch.device], _V]
    ) -> _V:
        """A value built once per (``key``, device) and kept with the process: the one
        per-device cache for tables derived from the process (``build(device)`` makes it)."""
        device = torch.device(device)
        cache: dict[tuple[str, torch.device], Any] = self.__dict__.setdefault("_device_cache", {})
        value = cache.get((key, device))
        if value is None:
            value = build(device)
            cache[(key, device)] = value
        return value  # type: ignore[no-any-return]

    # -- what a subclass implements ---------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)), float64, t's shape, for t in [0, T]."""
        raise NotImplementedError

    def time_at_lam(self, lam: Tensor) -> Tensor:
        r"""Inverse of :meth:`lam`: the time t in [0, T] with :math:`\lambda(t)` = ``lam``.

        The default bisects (lambda is decreasing in t), to float64 resolution; subclasses with a
        closed form override it. Meant for plan time.
        """
        lam = torch.as_tensor(lam, dtype=_F64)
        self._check_lam(lam)
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, float(self.num_timesteps))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.lam(mid) > lam  # lambda decreases: the root lies later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        t = 0.5 * (lo + hi)
        t = torch.where(lam == self.lam(lo.new_zeros(())), lo.new_zeros(()), t)
        t = torch.where(lam == self.lam(lo.new_tensor(float(self.num_timesteps))), hi, t)
        return t

    # -- derived ------------------------------------------------------------------------------------
    def _as_time(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=_F64)
        if t.dtype != _F64:
            t = t.to(_F64)
        return t

    def check_times(self, t: Tensor) -> None:
        """Raise ValueError unless every value of t lies in [0, T] (plan time only: syncs)."""
        if torch.isnan(t).any() or (t < 0).any() or (t > self.num_timesteps).any():
            raise ValueError(
                f"times must lie in [0, {self.num_timesteps}], got min {t.min().item()}, "
                f"max {t.max().item()}"
            )

    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha(t), float64."""
        return self.alpha_sigma(self._as_time(t))[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t), float64."""
        return self.alpha_sigma(self._as_time(t))[1]

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """alpha(t)^2 (the DDPM alpha_bar for a variance-preserving process), float64."""
        return self.alpha(t) ** 2

    def lam(self, t: Tensor | float) -> Tensor:
        r""":math:`\lambda(t) = \log(\alpha(t)/\sigma(t))`, float64 (+-inf at the ends)."""
        alpha, sigma = self.alpha_sigma(self._as_time(t))
        return _log_ratio(alpha, sigma)

    def snr(self, t: Tensor | float) -> Tensor:
        """alpha^2 / sigma^2, float64."""
        alpha, sigma = self.alpha_sigma(self._as_time(t))
        return (alpha / sigma) ** 2

    def derivatives(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(d alpha / ds, d sigma / ds) with s = t / T, float64, by forward-mode automatic
        differentiation (`torch.func.jvp`: unlike backward mode it also works under
        `torch.inference_mode` and inside custom operators, where autograd records nothing)."""
        t = self._as_time(t).detach()
        T = self.num_timesteps
        s = t / T
        tangents = torch.func.jvp(lambda u: self.alpha_sigma(u * T), (s,), (torch.ones_like(s),))[1]
        return tangents[0], tangents[1]

    def points(self, t: Tensor) -> Tensor:
        """Process points at times t: float64 (*t.shape, 5), :data:`POINT_FIELDS` on the last dim.

        A point is what :class:`tinydiff.denoiser.Denoiser` needs at one time: the network time
        and the coefficients that convert the network output into (x0, eps).
        """
        t = self._as_time(t)
        alpha, sigma = self.alpha_sigma(t)
        # an infinite slope (sqrt of a table at alpha = 0 or sigma = 0) is stored as 0: a plan
        # must stay finite, and no target can use a derivative there
        d_alpha, d_sigma = (
            torch.nan_to_num(d, posinf=0.0, neginf=0.0) for d in self.derivatives(t)
        )
        return torch.stack([t, alpha, sigma, d_alpha, d_sigma], dim=-1)

    def path_values(self, t: Tensor) -> PathValues:
        """The process at plan times t (float64 (S + 1,)): :class:`PathValues`."""
        t = self._as_time(t)
        self.check_times(t)
        alpha, sigma = self.alpha_sigma(t)
        return PathValues(t, alpha, sigma, _log_ratio(alpha, sigma), self)

    def prior_std(self) -> float:
        """The scale of the initial noise x_T ~ N(0, prior_std^2 I): sqrt(alpha(T)^2 +
        sigma(T)^2), the marginal std of data with unit variance (1 on variance-preserving
        processes; sqrt(1 + sigma_max^2) for a variance-exploding one, as in EDM)."""
        if self.variance_preserving:
            return 1.0
        alpha, sigma = self.alpha_sigma(torch.tensor(float(self.num_timesteps), dtype=_F64))
        return float((alpha**2 + sigma**2).sqrt())

    def lam_range(self) -> tuple[float, float]:
        """(lambda at t = T, lambda at t = 0) (possibly -inf / +inf)."""
        ends = self.lam(torch.tensor([float(self.num_timesteps), 0.0], dtype=_F64))
        return float(ends[0]), float(ends[1])

    def _check_lam(self, lam: Tensor) -> None:
        lo, hi = self.lam_range()
        if torch.isnan(lam).any() or (lam < lo).any() or (lam > hi).any():
            raise ValueError(
                f"log-SNR values lambda = log(alpha/sigma) must lie in [{lo:.6g}, {hi:.6g}] (the "
                f"process's range), got min {lam.min().item():.6g}, max {lam.max().item():.6g}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps})"


def _logit(alpha_bar: Tensor) -> Tensor:
    r""":math:`\log(\bar\alpha / (1 - \bar\alpha)) = 2\lambda` on a variance-preserving table
    (+inf at alpha_bar = 1, -inf at alpha_bar = 0)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def _interpolate(table: Tensor, t: Tensor) -> Tensor:
    """alpha_bar at real times t in [0, T] from the table (T + 1,): see `DiscreteVP`."""
    num_timesteps = table.numel() - 1
    t = t.to(device=table.device, dtype=_F64)
    if (t < 0).any() or (t > num_timesteps).any():
        raise ValueError(
            f"times must lie in [0, {num_timesteps}], got min {t.min().item()}, "
            f"max {t.max().item()}"
        )
    lo = t.floor().clamp(max=num_timesteps - 1).long()
    frac = t - lo
    a0, a1 = table[lo], table[lo + 1]
    l0, l1 = _logit(a0), _logit(a1)
    finite = torch.isfinite(l0) & torch.isfinite(l1)
    logit = torch.where(finite, l0 + frac * (l1 - l0), torch.zeros_like(l0))
    out = torch.where(finite, torch.sigmoid(logit), a0 + frac * (a1 - a0))
    # exact table values at the integers (sigmoid(logit(a)) may differ in the last bit)
    return torch.where(frac == 0, a0, torch.where(frac == 1, a1, out))


def _invert(table: Tensor, lam: Tensor) -> Tensor:
    """The time t in [0, T] with lambda(t) = lam on the interpolated table (T + 1,)."""
    num_timesteps = table.numel() - 1
    logit = 2 * torch.as_tensor(lam, dtype=_F64, device=table.device)
    logit_table = _logit(table)
    lo_l, hi_l = logit_table[-1], logit_table[0]
    if torch.isnan(logit).any() or (logit < lo_l).any() or (logit > hi_l).any():
        raise ValueError(
            f"log-SNR values lambda = log(alpha/sigma) must lie in [{lo_l.item() / 2:.6g}, "
            f"{hi_l.item() / 2:.6g}] (the schedule's range), got min "
            f"{logit.min().item() / 2:.6g}, max {logit.max().item() / 2:.6g}"
        )
    flat = logit.reshape(-1)
    # k: the segment [k, k + 1] with logit_table[k] >= logit >= logit_table[k + 1]
    above = (logit_table[None, :] > flat[:, None]).sum(dim=1)
    k = (above - 1).clamp(min=0, max=num_timesteps - 1)
    l0, l1 = logit_table[k], logit_table[k + 1]
    a0, a1 = table[k], table[k + 1]
    finite = torch.isfinite(l0) & torch.isfinite(l1)
    safe_den = torch.where(finite, l1 - l0, torch.ones_like(l0))
    frac_log = torch.where(finite, (flat - torch.where(finite, l0, 0.0)) / safe_den, 0.0)
    frac_lin = (torch.sigmoid(flat) - a0) / (a1 - a0)
    frac = torch.where(finite, frac_log, frac_lin)
    # exact ends: lam equal to a table value maps to its integer time
    frac = torch.where(flat == l0, torch.zeros_like(frac), frac)
    frac = torch.where(flat == l1, torch.ones_like(frac), frac)
    t = (k.to(_F64) + frac.clamp(0.0, 1.0)).clamp(0.0, float(num_timesteps))
    return t.reshape(logit.shape)


class DiscreteVP(GaussianProcess):
    r"""A variance-preserving process from a table :math:`\bar\alpha_t`, t = 0..T (DDPM).

    :math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1-\bar\alpha}`. Between
    consecutive integers :math:`\lambda` is interpolated linearly, so that
    `time_at_lam` is exact and closed-form per segment. On a segment with an infinite
    end (t in [0, 1] when alpha_bar_0 = 1, or [T - 1, T] under zero terminal SNR) lambda
    cannot be interpolated, and alpha_bar itself is interpolated linearly instead, which keeps
    the path continuous and monotone. Integer times return the table exactly. The smallest
    trained time `t_min` is 1 (training times are the integers 1..T).

    Args:
        alphas_cumprod: float64 (T + 1,), strictly decreasing, in [0, 1].
    """

    variance_preserving = True

    def __init__(self, alphas_cumprod: Tensor) -> None:
        super().__init__(alphas_cumprod.numel() - 1)
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", _F64)

    @property
    def t_min(self) -> float:
        """1: the network is trained at the integer times 1..T."""
        return 1.0

    def table(self, device: torch.device | str = "cpu") -> Tensor:
        """The alpha_bar table (T + 1,) on ``device`` (cached by `on_device`)."""
        return self.on_device("alphas_cumprod", device, self.alphas_cumprod.to)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """alpha_bar(t) interpolated as in the class docstring, float64, t's shape."""
        t = self._as_time(t)
        return _interpolate(self.table(t.device), t)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1 - ab).clamp_min(0).sqrt()

    def derivatives(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(d alpha / ds, d sigma / ds) of the interpolated table, s = t / T: on the segment to
        the right of t (to the left at t = T), so integers get one-sided derivatives."""
        t = self._as_time(t)
        tab = self.table(t.device)
        k = t.floor().clamp(max=self.num_timesteps - 1).long()
        a0, a1 = tab[k], tab[k + 1]
        ab = self.alpha_bar(t)
        dlogit = torch.log(a1) - torch.log1p(-a1) - torch.log(a0) + torch.log1p(-a0)
        finite = torch.isfinite(dlogit)
        d_ab = torch.where(finite, ab * (1 - ab) * torch.where(finite, dlogit, 0.0), a1 - a0)
        d_ab = d_ab * self.num_timesteps  # per unit s
        alpha, sigma = ab.sqrt(), (1 - ab).clamp_min(0).sqrt()
        return d_ab / (2 * alpha), -d_ab / (2 * sigma)

    def time_at_lam(self, lam: Tensor) -> Tensor:
        r"""The exact inverse of `lam` (float64, lam's shape): on a segment with finite
        lambda at both ends t = k + (lam - lam_k) / (lam_{k+1} - lam_k); on a segment with an
        infinite end it is linear in alpha_bar = sigmoid(2 lam). ``lam = +inf`` gives the first
        time with alpha_bar = 1 (t = 0 on the built-in schedules), ``-inf`` gives T under zero
        terminal SNR. Meant for plan time (it searches the table).

        Raises:
            ValueError: a value outside the schedule's lambda range, or NaN.
        """
        return _invert(self.alphas_cumprod, lam)

    def __repr__(self) -> str:
        return f"DiscreteVP(num_timesteps={self.num_timesteps})"


PathFn = Callable[..., tuple[Tensor, Tensor]]


class ContinuousProcess(GaussianProcess):
    r"""A process from functions of :math:`s = t/T \in [0, 1]`: ``fn(s, **kwargs) -> (alpha, sigma)``.

    The functions must be differentiable torch expressions in float64 (derivatives come from
    autograd) with :math:`\lambda = \log(\alpha/\sigma)` strictly decreasing in s; sigma may be
    0 at s = 0 and alpha may be 0 at s = 1. :meth:`time_at_lam` bisects unless ``inverse``
    (``lam -> s``) is given.

    Args:
        fn: the path.
        num_timesteps: T.
        kwargs: options of ``fn``.
        name: for messages.
        inverse: optional closed-form ``(lam, **kwargs) -> s``.
        variance_preserving: declare alpha^2 + sigma^2 = 1 (checked).

    Raises:
        ValueError: the path is not finite, negative, or lambda is not strictly decreasing on
            a grid of 1025 points.
    """

    def __init__(
        self,
        fn: PathFn,
        num_timesteps: int,
        kwargs: dict[str, object] | None = None,
        *,
        name: str = "process",
        inverse: Callable[..., Tensor] | None = None,
        variance_preserving: bool = False,
    ) -> None:
        super().__init__(num_timesteps)
        self.fn = fn
        self.kwargs = dict(kwargs or {})
        self.name = name
        self.inverse = inverse
        self.variance_preserving = variance_preserving
        self._validate()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = t / self.num_timesteps
        alpha, sigma = self.fn(s, **self.kwargs)
        alpha = torch.as_tensor(alpha, dtype=_F64).expand_as(s)
        sigma = torch.as_tensor(sigma, dtype=_F64).expand_as(s)
        return alpha, sigma

    def time_at_lam(self, lam: Tensor) -> Tensor:
        if self.inverse is None:
            return super().time_at_lam(lam)
        lam = torch.as_tensor(lam, dtype=_F64)
        self._check_lam(lam)
        s = torch.as_tensor(self.inverse(lam, **self.kwargs), dtype=_F64)
        return (s * self.num_timesteps).clamp(0.0, float(self.num_timesteps))

    def _validate(self) -> None:
        where = f"process {self.name!r} ({self.kwargs or 'no options'})"
        t = torch.linspace(0, self.num_timesteps, 1025, dtype=_F64)
        try:
            alpha, sigma = self.alpha_sigma(t)
        except Exception as err:
            raise ValueError(f"{where} failed on s in [0, 1]: {err}") from err
        if not (torch.isfinite(alpha).all() and torch.isfinite(sigma).all()):
            raise ValueError(f"{where} returned NaN or inf")
        if (alpha < 0).any() or (sigma < 0).any():
            raise ValueError(f"{where} returned negative alpha or sigma")
        lam = _log_ratio(alpha, sigma)
        if (lam[1:] >= lam[:-1]).any():
            raise ValueError(
                f"{where}: lambda = log(alpha / sigma) must be strictly decreasing in s (more "
                "noise at later times)"
            )
        if self.variance_preserving and not torch.allclose(
            alpha**2 + sigma**2, torch.ones_like(alpha), atol=1e-9
        ):
            raise ValueError(f"{where} is declared variance preserving but alpha^2 + sigma^2 != 1")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"ContinuousProcess({self.name!r}, num_timesteps={self.num_timesteps}{', ' + opts if opts else ''})"


class Point(NamedTuple):
    """A process point as tensors that broadcast against x: what targets receive.

    Each field has shape (bsz, 1, ..., 1) or is 0-dim (see :meth:`of`).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @classmethod
    def of(cls, points: Tensor, like: Tensor) -> Point:
        """Split ``points`` (5,) or (bsz, 5) into fields shaped to broadcast against ``like``
        (x's shape), in ``like``'s dtype except t (float64 stays float64, else float32)."""
        view = (-1,) + (1,) * (like.dim() - 1) if points.dim() == 2 else ()
        t, *rest = points.unbind(-1)
        coefs = [c.to(like.dtype).reshape(view) for c in rest]
        time_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return cls(t.to(time_dtype).reshape(view), *coefs)

    @classmethod
    def at(
        cls, process: GaussianProcess, t: Tensor, like: Tensor, *, derivatives: bool = False
    ) -> Point:
        """The process at per-sample times t (bsz,) (integer or real, on like's device) as
        fields shaped (bsz, 1, ..., 1) in ``like``'s dtype, t in the network time dtype; the
        slopes only with ``derivatives`` (zeros otherwise)."""
        view = (-1,) + (1,) * (like.dim() - 1)
        t64 = t.to(_F64)
        alpha, sigma = process.alpha_sigma(t64)
        if derivatives:
            d_alpha, d_sigma = process.derivatives(t64)
        else:
            d_alpha = d_sigma = torch.zeros((), dtype=_F64, device=like.device)
        coefs = [
            c.to(like.dtype).expand_as(t64).reshape(view) for c in (alpha, sigma, d_alpha, d_sigma)
        ]
        time_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return cls(t.to(time_dtype), *coefs)


def vp_point(t: Tensor, alpha_bar: Tensor) -> Tensor:
    """The point (`POINT_FIELDS`) of a variance-preserving process given by alpha_bar at time
    t (0-dim tensors): t, sqrt(alpha_bar), sqrt(1 - alpha_bar) and zero slopes; the form
    tinydiff 0.1's ``denoise(x, t, alpha_bar)`` call describes."""
    zero = torch.zeros_like(alpha_bar)
    return torch.stack(
        [t.to(alpha_bar.dtype), alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), zero, zero]
    )
