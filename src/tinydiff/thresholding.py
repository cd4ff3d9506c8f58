r"""Limits on the denoiser's x0 estimate: a static range and Imagen's dynamic thresholding.

A sampler step turns the denoiser's estimate :math:`\hat x_0` into the next iterate. Where the
signal is weak (small :math:`\alpha_t`) a ``pred_eps`` network's estimate
:math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t` amplifies the error of
:math:`\hat\epsilon` by :math:`1/\alpha_t`, and samples can leave the data's range by orders of
magnitude. Two remedies from the literature, both maps ``x0_hat (bsz, *shape) -> x0_hat``:

* :class:`ClipX0`: clamp every element to a fixed range ``[lo, hi]`` (Ho et al. 2020's
  sampler clips to ``[-1, 1]``; diffusers' ``clip_sample`` / ``clip_sample_range``).
* :class:`DynamicThreshold`: Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3):
  per sample, ``s`` is the ``percentile``-quantile of :math:`|\hat x_0|` over all non-batch
  elements, clamped to ``[1, max_value]``; the sample is clamped to ``[-s, s]`` and divided
  by ``s`` (diffusers' ``thresholding``, ``dynamic_thresholding_ratio``,
  ``sample_max_value``). The result always lies in ``[-1, 1]``.

Only x0 is changed: the noise estimate stays what the prediction target computed, as in
diffusers' ``DDIMScheduler`` (``use_clipped_model_output=False``, its default) and
``DDPMScheduler`` (whose posterior mean reads only x0 and x_t).

Both maps read no tensor value on the host (no ``.item()``, no data-dependent Python
branch), so they run inside compiled sampling loops. :func:`parse_clip_x0` and
:func:`parse_dynamic_threshold` turn the user-facing options (``clip_x0=``,
``dynamic_threshold=`` of :class:`~tinydiff.DiffusionModelConfig` and
:meth:`~tinydiff.DiffusionModel.sample`) into these objects, and :func:`x0_limit` resolves a
config's setting against a per-call one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tinydiff._validation import check_number

__all__ = [
    "ClipX0",
    "DynamicThreshold",
    "X0Limit",
    "parse_clip_x0",
    "parse_dynamic_threshold",
    "x0_limit",
]


@dataclass(frozen=True)
class ClipX0:
    """Clamp x0 elementwise to ``[lo, hi]`` (diffusers' ``clip_sample``: ``lo = -hi``).

    Attributes:
        lo: lower bound, finite.
        hi: upper bound, finite, ``> lo``.
    """

    lo: float
    hi: float

    def __post_init__(self) -> None:
        lo = check_number("lo", self.lo, owner="clip_x0")
        hi = check_number("hi", self.hi, owner="clip_x0")
        if not lo < hi:
            raise ValueError(
                f"clip_x0 needs lo < hi, got ({self.lo!r}, {self.hi!r}); e.g. clip_x0=(-1, 1) "
                "for data scaled to [-1, 1]"
            )
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def __call__(self, x0: Tensor) -> Tensor:
        """x0 (bsz, *shape) clamped to [lo, hi], same shape and dtype."""
        return x0.clamp(self.lo, self.hi)

    def as_option(self) -> tuple[float, float]:
        """The config form ``(lo, hi)``."""
        return (self.lo, self.hi)


@dataclass(frozen=True)
class DynamicThreshold:
    r"""Imagen's dynamic thresholding of x0 (Saharia et al. 2022, sec. 2.3).

    Per sample b: :math:`s_b = \min(\text{max\_value}, \max(1, q_b))` with :math:`q_b` the
    ``percentile``-quantile (linear interpolation, as :func:`torch.quantile`) of
    :math:`|\hat x_0[b]|` over its non-batch elements; then
    :math:`\hat x_0[b] \leftarrow \mathrm{clamp}(\hat x_0[b], -s_b, s_b) / s_b`.
    With ``max_value = 1`` this is clipping to ``[-1, 1]``. Half-precision inputs are
    thresholded in float32 and cast back (diffusers does the same).

    Attributes:
        percentile: the quantile level p, in (0, 1] (Imagen and diffusers: 0.995).
        max_value: the largest s, ``> 0`` (diffusers' ``sample_max_value``; Imagen uses
            values > 1, e.g. 1.5 to 2 with strong guidance).
    """

    percentile: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        p = check_number("percentile", self.percentile, owner="dynamic_threshold")
        if not 0.0 < p <= 1.0:
            raise ValueError(
                f"dynamic_threshold's percentile must be in (0, 1] (a quantile level, e.g. "
                f"0.995), got {self.percentile!r}"
            )
        v = check_number("max_value", self.max_value, owner="dynamic_threshold")
        if not v > 0.0:
            raise ValueError(
                f"dynamic_threshold's max_value must be > 0 (the largest threshold s, e.g. 1.0 "
                f"or 2.0), got {self.max_value!r}"
            )
        object.__setattr__(self, "percentile", p)
        object.__setattr__(self, "max_value", v)

    def __call__(self, x0: Tensor) -> Tensor:
        """x0 (bsz, *shape) thresholded per sample, same shape and dtype."""
        if x0.dim() < 2:
            raise ValueError(
                f"dynamic thresholding needs x0 of shape (bsz, *shape), got {tuple(x0.shape)}"
            )
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        s = _quantile_rows(flat.abs(), self.percentile)
        s = s.clamp(min=1.0).clamp(max=self.max_value).unsqueeze(1)  # (bsz, 1)
        out = torch.clamp(flat, -s, s) / s
        return out.reshape(x0.shape).to(dtype)

    def as_option(self) -> tuple[float, float]:
        """The config form ``(percentile, max_value)``."""
        return (self.percentile, self.max_value)


#: what the denoiser applies to its x0 estimate
X0Limit = ClipX0 | DynamicThreshold


def _quantile_rows(values: Tensor, q: float) -> Tensor:
    """The q-quantile of each row of ``values`` (n, m), (n,), linearly interpolated like
    :func:`torch.quantile` (which refuses inputs over 2**24 elements; this does not).

    The position q (m - 1) is a Python number, so no tensor value is read on the host.
    """
    m = values.shape[1]
    pos = q * (m - 1)
    lo = min(math.floor(pos), m - 1)
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    ordered = values.sort(dim=1).values
    low = ordered[:, lo]
    if frac == 0.0 or hi == lo:
        return low
    return torch.lerp(low, ordered[:, hi], frac)


def _pair(name: str, value: Sequence[Any], example: str) -> tuple[Any, Any]:
    if len(value) != 2:
        raise ValueError(f"{name} as a sequence must have 2 entries {example}, got {value!r}")
    return value[0], value[1]


def parse_clip_x0(value: Any) -> ClipX0 | None:
    """The :class:`ClipX0` of a user-facing ``clip_x0`` option.

    Args:
        value: None or False (no clipping); a positive number c, meaning ``(-c, c)``; a pair
            ``(lo, hi)`` with lo < hi (a tuple or list, e.g. from JSON); a dict
            ``{"lo": ..., "hi": ...}``; or a :class:`ClipX0`.

    Returns:
        The clipping map, or None for no clipping.

    Raises:
        TypeError: another type (e.g. True, a string).
        ValueError: a non-positive c, a pair of the wrong length, lo >= hi, NaN or inf.
    """
    if value is None or value is False:
        return None
    if isinstance(value, ClipX0):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        c = check_number("clip_x0", value)
        if not c > 0:
            raise ValueError(
                f"clip_x0 as a number c means the range (-c, c) and must be > 0, got {value!r}"
            )
        return ClipX0(-c, c)
    if isinstance(value, Mapping):
        if set(value) != {"lo", "hi"}:
            raise ValueError(
                f"clip_x0 as a dict needs exactly the keys 'lo' and 'hi', got {sorted(value)}"
            )
        return ClipX0(value["lo"], value["hi"])
    if isinstance(value, (tuple, list)):
        return ClipX0(*_pair("clip_x0", value, "(lo, hi)"))
    raise TypeError(
        f"clip_x0 must be None, a number c (the range (-c, c)), a pair (lo, hi) or a dict "
        f"{{'lo': ..., 'hi': ...}}; got {value!r} ({type(value).__name__})"
    )


def parse_dynamic_threshold(value: Any) -> DynamicThreshold | None:
    """The :class:`DynamicThreshold` of a user-facing ``dynamic_threshold`` option.

    Args:
        value: None or False (off); True (Imagen's and diffusers' defaults, percentile
            0.995 and max_value 1.0); a pair ``(percentile, max_value)``; a dict with the
            keys ``percentile`` and/or ``max_value`` (missing ones take the defaults); or a
            :class:`DynamicThreshold`.

    Returns:
        The thresholding map, or None for off.

    Raises:
        TypeError: another type (e.g. a number, a string).
        ValueError: a pair of the wrong length, unknown dict keys, a percentile outside
            (0, 1], a max_value <= 0.
    """
    if value is None or value is False:
        return None
    if value is True:
        return DynamicThreshold()
    if isinstance(value, DynamicThreshold):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"percentile", "max_value"})
        if unknown:
            raise ValueError(
                f"dynamic_threshold as a dict takes the keys 'percentile' and 'max_value', "
                f"got unknown keys {unknown}"
            )
        return DynamicThreshold(**value)
    if isinstance(value, (tuple, list)):
        return DynamicThreshold(*_pair("dynamic_threshold", value, "(percentile, max_value)"))
    raise TypeError(
        "dynamic_threshold must be None, True (percentile 0.995, max_value 1), a pair "
        "(percentile, max_value) or a dict {'percentile': ..., 'max_value': ...}; got "
        f"{value!r} ({type(value).__name__})"
    )


def x0_limit(
    clip_x0: Any = None,
    dynamic_threshold: Any = None,
    *,
    default: X0Limit | None = None,
) -> X0Limit | None:
    """The x0 limit to sample with, from per-call options and a configured default.

    When both per-call options are None, ``default`` (e.g. from the config) applies; when
    either is given, the per-call pair replaces it (``False`` turns a configured limit off for
    this call).

    Args:
        clip_x0: see :func:`parse_clip_x0`.
        dynamic_threshold: see :func:`parse_dynamic_threshold`.
        default: the limit used when neither option is given.

    Returns:
        A :class:`ClipX0`, a :class:`DynamicThreshold`, or None (x0 is left as estimated).

    Raises:
        ValueError: both options set (diffusers' ``thresholding`` would silently win over
            ``clip_sample``; here one has to choose), or a bad option.
        TypeError: a bad option type.
    """
    if clip_x0 is None and dynamic_threshold is None:
        return default
    clip = parse_clip_x0(clip_x0)
    threshold = parse_dynamic_threshold(dynamic_threshold)
    if clip is not None and threshold is not None:
        raise ValueError(
            "clip_x0 and dynamic_threshold were both set; choose one (dynamic thresholding "
            "already returns x0 in [-1, 1])"
        )
    return clip if clip is not None else threshold
