r"""The sampler contract, the registry, and the loop that runs any sampler.

Data flows one way (k-diffusion's idea of a denoiser wrapper, made plan-based):

1. :meth:`Sampler.plan` turns the sampling times :math:`t_0 > t_1 > \dots > t_S = 0` and the
   process there, :math:`\alpha(t_i)`, :math:`\sigma(t_i)`, :math:`\lambda(t_i)` (float64,
   :class:`tinydiff.process.PathValues`), into per-step coefficient tables, built once. The
   coefficients hold for any Gaussian path (alpha^2 + sigma^2 need not be 1);
2. :func:`run_sampler` casts the tables to x's device and dtype and calls :meth:`Sampler.step`
   S times. A step only does tensor math: no ``.item()``, no timestep search, no
   data-dependent Python branch, so that ``torch.compile`` can fuse it and CUDA graphs can
   capture it. Lower-order first or last steps are expressed as coefficients (zeros), not
   branches.

The network is reached only through a :class:`tinydiff.denoiser.Denoiser`, called as
``denoise(x, c["point"])``, which turns x_t at a process point into :class:`Prediction`
(x0_hat, eps_hat): samplers never care what the network was trained to predict.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tinydiff._registry import Registry
from tinydiff.denoiser import Prediction
from tinydiff.process import PathValues
from tinydiff.variances import Variance

__all__ = [
    "LOWER_ORDER_FINAL_STEPS",
    "REGISTRY",
    "Denoiser",
    "PathValues",
    "Prediction",
    "Sampler",
    "StepLoop",
    "get",
    "names",
    "register",
    "run_sampler",
]

State = tuple[Tensor, ...]

#: multistep samplers with ``lower_order_final`` lower the order of their final steps when a
#: plan has fewer steps than this (Lu et al. 2022, sec. 4)
LOWER_ORDER_FINAL_STEPS = 15


class Denoiser(Protocol):
    """What a sampler calls: ``denoise(x_t, point) -> Prediction``
    (:class:`tinydiff.denoiser.Denoiser`).

    ``point`` is a row of a plan's ``point`` column, (5,) on x's device: the network time and
    the process coefficients there (:data:`tinydiff.process.POINT_FIELDS`). ``variance`` is
    the model's variance type, for samplers that use the reverse variance.
    """

    variance: Variance

    def __call__(self, x: Tensor, point: Tensor) -> Prediction: ...


class StepLoop(Protocol):
    """A compiled per-run step driver (see :mod:`tinydiff._compile`).

    ``loop(i, x, state, noise) -> (x_next, state_next)`` runs step i. When
    ``transient_outputs`` is true the returned tensors are overwritten by the next call (CUDA
    graph replay) and must be cloned to be kept.
    """

    transient_outputs: bool

    def __call__(
        self, i: int, x: Tensor, state: tuple[Tensor, ...], noise: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]: ...


class Sampler:
    """Base class of samplers. Options are keyword arguments of ``__init__``.

    Subclasses implement :meth:`plan` and :meth:`step`, and override :meth:`nfe`,
    :meth:`init_state` and :attr:`stochastic` where needed.

    ``step`` receives ``c``, the plan row of the current step: the sampler's own columns plus
    ``t`` and ``t_next`` (0-dim tensors, x's dtype) and ``point`` (the process point at t, to
    call the denoiser with: ``denoise(x, c["point"])``). A sampler that calls the denoiser at
    other times adds its own point columns with ``path.process.points(times)``.
    """

    #: steps that draw fresh Gaussian noise get it as ``step``'s ``noise`` argument
    stochastic: ClassVar[bool] = False
    #: the :mod:`tinydiff.spacings` name used when neither the call nor the config names a
    #: timestep spacing (chosen per sampler from ``benchmarks/sampler_quality.py``)
    default_spacing: ClassVar[str] = "trailing"

    @property
    def is_stochastic(self) -> bool:
        """Whether :meth:`step` needs noise with these options."""
        return self.stochastic

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> Sampler:
        """Build the sampler from ``options``, turning a bad option into a clear error.

        Raises:
            TypeError: an unknown option name; the message lists the accepted ones.
            ValueError: an option value out of range (raised by the sampler).
        """
        try:
            return cls(**dict(options))
        except TypeError as err:
            accepted = [
                p.name
                for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            raise TypeError(
                f"invalid sampler_kwargs {dict(options)} for sampler {cls.__name__}: {err}. "
                f"Accepted options: {', '.join(accepted) or 'none'}"
            ) from err

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for ``num_steps`` sampling steps."""
        return num_steps

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        """Per-step coefficients.

        Args:
            path: the process at the sampling times (``path.t``: float64 (S + 1,), strictly
                decreasing, ``path.t[-1] == 0``; ``path.alpha``, ``path.sigma``, ``path.lam``).

        Returns:
            dict of float64 tensors with leading dimension S (row i is used by step i).
        """
        return {}

    def init_state(self, x: Tensor) -> State:
        """Solver history carried between steps (bounded by the method's order)."""
        return ()

    def step(
        self,
        x: Tensor,
        state: State,
        c: Mapping[str, Tensor],
        denoise: Denoiser,
        noise: Tensor | None,
    ) -> tuple[Tensor, State]:
        """One step from ``c["t"]`` to ``c["t_next"]``; returns (x_next, state)."""
        raise NotImplementedError


def _check_sampler(obj: Any) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Sampler)):
        raise TypeError(f"a sampler must be a subclass of tinydiff.samplers.Sampler, got {obj!r}")


REGISTRY: Registry[type[Sampler]] = Registry("sampler", _check_sampler)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def _is_legacy(sampler: Sampler) -> bool:
    params = list(inspect.signature(sampler.plan).parameters)
    return len(params) == 2 and params[1] == "alpha_bar"


def build_plan(sampler: Sampler, path: PathValues) -> dict[str, Tensor]:
    """The sampler's plan plus the shared columns ``t``, ``t_next`` and ``point``, float64 on
    the CPU.

    A sampler written for tinydiff 0.1 (``plan(timesteps, alpha_bar)``, calling
    ``denoise(x, t, alpha_bar)``) still runs on variance-preserving processes, with a
    DeprecationWarning; it also gets the ``alpha_bar`` and ``alpha_bar_next`` columns.
    """
    timesteps = path.t
    legacy = _is_legacy(sampler)
    if legacy:
        if not path.process.variance_preserving:
            raise ValueError(
                f"sampler {type(sampler).__name__} uses the tinydiff 0.1 contract "
                "plan(timesteps, alpha_bar), which only describes variance-preserving "
                f"processes, not {path.process!r}; write plan(self, path) with path.alpha, "
                "path.sigma, path.lam"
            )
        warnings.warn(
            f"sampler {type(sampler).__name__} uses the tinydiff 0.1 contract plan(timesteps, "
            "alpha_bar); write plan(self, path) (tinydiff.process.PathValues) and call "
            "denoise(x, c['point']) to support every process",
            DeprecationWarning,
            stacklevel=3,
        )
        alpha_bar = path.alpha**2
        plan = dict(sampler.plan(timesteps, alpha_bar))  # type: ignore[call-arg, arg-type]
    else:
        plan = dict(sampler.plan(path))
    num_steps = timesteps.numel() - 1
    for key, value in plan.items():
        if value.shape[:1] != (num_steps,):
            raise ValueError(
                f"{type(sampler).__name__}.plan() column {key!r} has shape {tuple(value.shape)}; "
                f"expected leading dimension {num_steps} (one row per step)"
            )
    plan.update(t=timesteps[:-1], t_next=timesteps[1:], point=path.process.points(timesteps[:-1]))
    if legacy:
        plan.update(alpha_bar=alpha_bar[:-1], alpha_bar_next=alpha_bar[1:])
    return plan


def run_sampler(
    sampler: Sampler,
    x: Tensor,
    plan: Mapping[str, Tensor],
    denoise: Denoiser,
    *,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    loop: StepLoop | None = None,
) -> Tensor:
    """Run ``sampler`` from x (noise at ``plan["t"][0]``) down to t = 0.

    Args:
        sampler: the sampler.
        x: initial noise, (bsz, *input_shape).
        plan: from :func:`build_plan`; cast here to x's device and dtype.
        denoise: the wrapped model.
        generator: source of the per-step noise of stochastic samplers.
        return_trajectory: return every iterate, (S + 1, bsz, *input_shape), noise first.
        progress: show a tqdm bar.
        loop: a compiled step driver for this sampler, plan and x (from
            :meth:`tinydiff._compile.CompiledStep.stepper`); None runs ``sampler.step`` eagerly.

    Returns:
        (bsz, *input_shape), or the trajectory.
    """
    num_steps = plan["t"].shape[0]
    stochastic = sampler.is_stochastic
    state = sampler.init_state(x)
    if loop is None:
        table = {k: v.to(device=x.device, dtype=x.dtype) for k, v in plan.items()}

        def eager_step(
            i: int, x: Tensor, state: State, noise: Tensor | None
        ) -> tuple[Tensor, State]:
            return sampler.step(x, state, {k: v[i] for k, v in table.items()}, denoise, noise)

        step, transient = eager_step, False
    else:
        step, transient = loop, loop.transient_outputs
    trajectory = [x] if return_trajectory else None
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        noise = (
            torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if stochastic
            else None
        )
        x, state = step(i, x, state, noise)
        if trajectory is not None:
            trajectory.append(x.clone() if transient else x)
    if trajectory is not None:
        return torch.stack(trajectory)
    return x.clone() if transient else x
