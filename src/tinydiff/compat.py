"""tinydiff 0.1 compatibility: every adapter for components written for 0.1's contracts.

0.1 described a variance-preserving process by its table alpha_bar; 0.2 by a Gaussian
process (alpha, sigma at any time). Components registered with the 0.1 signatures keep
working on variance-preserving processes, with a DeprecationWarning when they are used, and
are refused with a message on other processes:

* a prediction target with ``target(x0, eps, alpha_bar)`` / ``to_x0_eps(out, x_t, alpha_bar)``;
* a sampler with ``plan(timesteps, alpha_bar)`` whose step calls ``denoise(x, t, alpha_bar)``
  (it also gets the plan columns ``alpha_bar`` and ``alpha_bar_next``);
* a timestep spacing ``fn(num_timesteps, num_steps, alphas_cumprod)``.

`install` puts the adapters into the registries (`tinydiff.Registry.add_adapter`); the
package does it on import. The core modules know nothing of 0.1: the registries hand them
components of the current contracts only.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from tinydiff import samplers, spacings, targets
from tinydiff.process import DiscreteVP, GaussianProcess, PathValues, Point, vp_point
from tinydiff.samplers.base import Prediction, State
from tinydiff.targets import Target

__all__ = ["adapt_sampler", "adapt_spacing", "adapt_target", "install"]


def _param(fn: Any, index: int) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params[index] if len(params) > index else None


def _warn(what: str, advice: str) -> None:
    warnings.warn(
        f"{what} uses the tinydiff 0.1 contract; {advice} to support every process",
        DeprecationWarning,
        stacklevel=4,
    )


# -- targets -------------------------------------------------------------------------------------
def adapt_target(cls: Any) -> Any:
    """``cls`` itself, or for a 0.1 target (methods taking ``alpha_bar``) a `Target` class
    whose instances wrap one of ``cls`` (alpha_bar = alpha^2: variance-preserving only)."""
    if _param(cls.target, 3) != "alpha_bar":  # (self, x0, eps, alpha_bar)
        return cls

    class LegacyTarget(Target):
        supports_zero_snr = getattr(cls, "supports_zero_snr", True)

        def __init__(self, **kwargs: Any) -> None:
            _warn(
                f"prediction target {cls.__name__}",
                "write target(x0, eps, p) with p a tinydiff.process.Point (p.alpha, p.sigma)",
            )
            self.inner = cls(**kwargs)

        def target(self, x0: Tensor, eps: Tensor, p: Point) -> Tensor:
            return self.inner.target(x0, eps, p.alpha**2)  # type: ignore[no-any-return]

        def to_x0_eps(self, out: Tensor, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor]:
            return self.inner.to_x0_eps(out, x_t, p.alpha**2)  # type: ignore[no-any-return]

        def x0_error_scale(self, snr: Tensor) -> Tensor:
            return self.inner.x0_error_scale(snr)  # type: ignore[no-any-return]

    LegacyTarget.__name__ = LegacyTarget.__qualname__ = cls.__name__
    LegacyTarget.__doc__ = cls.__doc__
    return LegacyTarget


# -- samplers ------------------------------------------------------------------------------------
class _LegacyDenoise:
    """What a 0.1 sampler's step calls: ``denoise(x, t, alpha_bar)`` (or the current form)."""

    __slots__ = ("denoise", "variance")

    def __init__(self, denoise: Any) -> None:
        self.denoise = denoise
        self.variance = denoise.variance

    def __call__(self, x: Tensor, point: Tensor, alpha_bar: Tensor | None = None) -> Prediction:
        if alpha_bar is not None:
            point = vp_point(point, alpha_bar)
        return self.denoise(x, point)  # type: ignore[no-any-return]


def adapt_sampler(cls: Any) -> Any:
    """``cls`` itself, or for a 0.1 sampler (``plan(timesteps, alpha_bar)``) a subclass whose
    ``plan(path)`` calls the old one on a variance-preserving process and whose step hands
    the old step a denoiser that takes ``(x, t, alpha_bar)``."""
    if _param(cls.plan, 2) != "alpha_bar":  # (self, timesteps, alpha_bar)
        return cls

    class LegacySampler(cls):  # type: ignore[misc, valid-type]
        def plan(self, path: PathValues) -> dict[str, Tensor]:
            if not path.process.variance_preserving:
                raise ValueError(
                    f"sampler {cls.__name__} uses the tinydiff 0.1 contract plan(timesteps, "
                    "alpha_bar), which only describes variance-preserving processes, not "
                    f"{path.process!r}; write plan(self, path) with path.alpha, path.sigma, "
                    "path.lam"
                )
            _warn(
                f"sampler {cls.__name__}",
                "write plan(self, path) (tinydiff.process.PathValues) and call "
                "denoise(x, c['point'])",
            )
            alpha_bar = path.alpha**2
            plan = dict(cls.plan(self, path.t, alpha_bar))
            plan.update(alpha_bar=alpha_bar[:-1], alpha_bar_next=alpha_bar[1:])
            return plan

        def step(
            self, x: Tensor, state: State, c: Mapping[str, Tensor], denoise: Any, noise: Any
        ) -> tuple[Tensor, State]:
            return cls.step(self, x, state, c, _LegacyDenoise(denoise), noise)  # type: ignore[no-any-return]

    LegacySampler.__name__ = LegacySampler.__qualname__ = cls.__name__
    LegacySampler.__doc__ = cls.__doc__
    return LegacySampler


# -- spacings ------------------------------------------------------------------------------------
def adapt_spacing(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` itself, or for a 0.1 spacing ``fn(num_timesteps, num_steps, alphas_cumprod)`` a
    spacing of the current contract that hands it the alpha_bar table of a discrete
    variance-preserving process."""
    if _param(fn, 2) != "alphas_cumprod":
        return fn

    @functools.wraps(fn)
    def spacing(num_timesteps: int, num_steps: int, process: GaussianProcess) -> Tensor:
        if not isinstance(process, DiscreteVP):
            raise ValueError(
                f"timestep spacing {getattr(fn, '__name__', fn)!r} takes an alphas_cumprod "
                f"table (the tinydiff 0.1 contract), which {process!r} does not have; write "
                "fn(num_timesteps, num_steps, process) with process.lam / process.time_at_lam"
            )
        _warn(
            f"timestep spacing {getattr(fn, '__name__', fn)!r}",
            "write fn(num_timesteps, num_steps, process)",
        )
        return fn(num_timesteps, num_steps, process.alphas_cumprod)

    return spacing


def install() -> None:
    """Put the adapters into the target, sampler and spacing registries (idempotent)."""
    for registry, adapter in (
        (targets.REGISTRY, adapt_target),
        (samplers.REGISTRY, adapt_sampler),
        (spacings.REGISTRY, adapt_spacing),
    ):
        registry.add_adapter(adapter)
