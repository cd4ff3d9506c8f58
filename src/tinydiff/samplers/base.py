r"""The sampler contract, the registry, and the loop that runs any sampler.

Data flows one way (k-diffusion's idea of a denoiser wrapper, made plan-based):

1. :meth:`Sampler.plan` turns the sampling times :math:`t_0 > t_1 > \dots > t_S = 0` and
   :math:`\bar\alpha_{t_i}` (float64) into per-step coefficient tables, built once;
2. :func:`run_sampler` casts the tables to x's device and dtype and calls :meth:`Sampler.step`
   S times. A step only does tensor math: no ``.item()``, no timestep search, no
   data-dependent Python branch, so that ``torch.compile`` can fuse it and CUDA graphs can
   capture it. Lower-order first or last steps are expressed as coefficients (zeros), not
   branches.

The network is reached only through a :class:`Denoiser`, which turns (x_t, t) into
:class:`Prediction` (x0_hat, eps_hat): samplers never care what the network was trained to
predict.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tinydiff._registry import Registry
from tinydiff.variances import Variance

__all__ = [
    "REGISTRY",
    "Denoiser",
    "Prediction",
    "Sampler",
    "StepLoop",
    "get",
    "names",
    "register",
    "run_sampler",
]

State = tuple[Tensor, ...]


class Prediction(NamedTuple):
    """The denoiser's output at one (x_t, t).

    Attributes:
        x0: estimate of the clean data, x's shape.
        eps: estimate of the noise, x's shape.
        var_out: the network's variance channels (``learned_range``), or None.
    """

    x0: Tensor
    eps: Tensor
    var_out: Tensor | None


class Denoiser(Protocol):
    """What a sampler calls: the model wrapped as ``(x_t, t, alpha_bar_t) -> Prediction``.

    ``t`` and ``alpha_bar`` are 0-dim tensors on x's device (t on the [0, T] scale).
    ``variance`` is the model's variance type, for samplers that use the reverse variance.
    """

    variance: Variance

    def __call__(self, x: Tensor, t: Tensor, alpha_bar: Tensor) -> Prediction: ...


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
    ``t``, ``t_next``, ``alpha_bar`` and ``alpha_bar_next`` (0-dim tensors, x's dtype).
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

    def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
        """Per-step coefficients.

        Args:
            timesteps: float64 (S + 1,), strictly decreasing, ``timesteps[-1] == 0``.
            alpha_bar: float64 (S + 1,), alpha_bar at those times.

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


def build_plan(sampler: Sampler, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
    """The sampler's plan plus the shared columns, float64 on the CPU."""
    plan = dict(sampler.plan(timesteps, alpha_bar))
    num_steps = timesteps.numel() - 1
    for key, value in plan.items():
        if value.shape[:1] != (num_steps,):
            raise ValueError(
                f"{type(sampler).__name__}.plan() column {key!r} has shape {tuple(value.shape)}; "
                f"expected leading dimension {num_steps} (one row per step)"
            )
    plan.update(
        t=timesteps[:-1],
        t_next=timesteps[1:],
        alpha_bar=alpha_bar[:-1],
        alpha_bar_next=alpha_bar[1:],
    )
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
