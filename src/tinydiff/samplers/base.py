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

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from tinydiff import denoiser as _denoiser
from tinydiff._progress import progress_bar
from tinydiff._registry import Registry, class_check, instantiate
from tinydiff.denoiser import Prediction
from tinydiff.process import PathValues
from tinydiff.variances import Variance

__all__ = [
    "LOWER_ORDER_FINAL_STEPS",
    "REGISTRY",
    "Denoiser",
    "Noise",
    "PathValues",
    "Prediction",
    "Row",
    "Sampler",
    "State",
    "StepLoop",
    "StepResult",
    "get",
    "names",
    "register",
    "run_loop",
    "run_sampler",
]

#: a sampler's history carried between steps
State = tuple[Tensor, ...]
#: one row of a plan: the step's coefficients, ``t``, ``t_next`` and ``point``
Row = Mapping[str, Tensor]
#: the fresh Gaussian noise of a stochastic step (None for deterministic ones)
Noise = Tensor | None
#: what a step returns: (x_next, state)
StepResult = tuple[Tensor, State]

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

    ``loop(i, x, state, noise) -> (x_next, state_next)`` runs step i and keeps the guidance
    state of the run itself; ``first_x0`` is the step's first x0 estimate (None unless the
    driver was built for a callback). When ``transient_outputs`` is true the returned tensors
    are overwritten by the next call (CUDA graph replay) and must be cloned to be kept.
    """

    transient_outputs: bool
    first_x0: Tensor | None

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
        what = f"sampler_kwargs {dict(options)} for sampler {cls.__name__}"
        return instantiate(cls, options, what)  # type: ignore[no-any-return]

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

    def check_denoiser(self, denoiser: Any) -> None:
        """Raise ValueError if this sampler cannot run ``denoiser`` (called by
        `tinydiff.sampling.sample` before the first step); the default accepts any."""

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        """One step from ``c["t"]`` to ``c["t_next"]``; returns (x_next, state)."""
        raise NotImplementedError


REGISTRY: Registry[type[Sampler]] = Registry(
    "sampler",
    class_check("a sampler must be a subclass of tinydiff.samplers.Sampler", base=Sampler),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def build_plan(sampler: Sampler, path: PathValues) -> dict[str, Tensor]:
    """The sampler's plan plus the shared columns ``t``, ``t_next`` and ``point``, float64 on
    the CPU.

    A sampler written for tinydiff 0.1 is adapted when it is registered (`tinydiff.compat`).
    """
    timesteps = path.t
    plan = dict(sampler.plan(path))
    num_steps = timesteps.numel() - 1
    for key, value in plan.items():
        if value.shape[:1] != (num_steps,):
            raise ValueError(
                f"{type(sampler).__name__}.plan() column {key!r} has shape {tuple(value.shape)}; "
                f"expected leading dimension {num_steps} (one row per step)"
            )
    plan.update(t=timesteps[:-1], t_next=timesteps[1:], point=path.process.points(timesteps[:-1]))
    return plan


#: a per-step callback: ``callback(i, t_next, x_next, x0_hat) -> Tensor | None``
Callback = Callable[[int, float, Tensor, Tensor | None], Tensor | None]


class _Recorder:
    """A plain denoise callable seen as a bound denoiser: records the step's first x0."""

    __slots__ = ("denoise", "end_time", "first_x0", "variance")

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise = denoise
        self.variance = denoise.variance
        self.end_time = bool(getattr(denoise, "end_time", False))
        self.first_x0: Tensor | None = None

    def __call__(self, x: Tensor, point: Tensor, **end_time: Tensor) -> Prediction:
        pred = self.denoise(x, point, **end_time)  # r= for two-time networks (flow maps)
        if self.first_x0 is None:
            self.first_x0 = pred.x0
        return pred


def _check_replacement(out: Any, like: Tensor, i: int) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the sampling callback returned {got} after step {i}; expected None (keep x) or "
            f"a tensor of x's shape {tuple(like.shape)}"
        )
    if out.dtype != like.dtype or out.device != like.device:
        out = out.to(device=like.device, dtype=like.dtype)
    return out


def run_loop(
    sampler: Sampler,
    x: Tensor,
    plan: Mapping[str, Tensor],
    denoise: Denoiser,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    loop: StepLoop | None = None,
) -> Tensor:
    """Run ``sampler`` over ``plan`` from x (the sample at ``plan["t"][0]``): the loop
    behind every sampling call (`tinydiff.sampling.sample`).

    Args:
        sampler: the sampler.
        x: the sample at the plan's first time, (bsz, *input_shape).
        plan: from `build_plan`; cast here to x's device and dtype.
        denoise: a `tinydiff.denoiser.Denoiser` (its guidance state is carried from step to
            step) or any callable ``denoise(x, point) -> Prediction`` with a ``variance``.
        generator: source of the per-step noise of stochastic samplers.
        callback: ``callback(i, t_next, x_next, x0_hat)``, run eagerly after step i with the
            time the step reached (a float), the new sample and the step's first x0
            estimate; a returned tensor replaces x_next (the solver's history is kept), None
            keeps it. Tensors handed to it are the caller's to keep.
        loop: a compiled step driver for this sampler, plan and x
            (`tinydiff._compile.StepCache.loop`); None runs ``sampler.step`` eagerly.

    Returns:
        the sample at t = 0, (bsz, *input_shape).
    """
    num_steps = plan["t"].shape[0]
    stochastic = sampler.is_stochastic
    state = sampler.init_state(x)
    t_next = plan["t_next"].tolist() if callback is not None else None
    if loop is None:
        table = {k: v.to(device=x.device, dtype=x.dtype) for k, v in plan.items()}
        full = denoise if isinstance(denoise, _denoiser.Denoiser) else None
        bind = None if full is None else full.bind
        gstate = () if full is None else full.init_state(x)
        guided = full is not None and full.guidance is not None
        index = torch.zeros((), dtype=torch.int64, device=x.device) if guided else None
    transient = loop is not None and loop.transient_outputs
    for i in range(num_steps):
        noise = (
            torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if stochastic
            else None
        )
        if loop is None:
            view: Any = bind(gstate, index) if bind is not None else _Recorder(denoise)
            x_next, state = sampler.step(x, state, {k: v[i] for k, v in table.items()}, view, noise)
            x0_hat = view.first_x0
            if bind is not None:
                gstate = view.state
            if index is not None:
                index = index + 1
        else:
            x_next, state = loop(i, x, state, noise)
            x0_hat = loop.first_x0
        if callback is not None:
            assert t_next is not None
            if transient:  # CUDA-graph outputs are overwritten by the next replay
                x_next = x_next.clone()
                x0_hat = None if x0_hat is None else x0_hat.clone()
            out = callback(i, t_next[i], x_next, x0_hat)
            if out is not None:
                x_next = _check_replacement(out, x_next, i)
        x = x_next
    return x.clone() if transient and callback is None else x


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
    callback: Callback | None = None,
) -> Tensor:
    """Run ``sampler`` from x (noise at ``plan["t"][0]``) down to t = 0 (`run_loop` with
    the trajectory and progress bar as callbacks).

    Args:
        sampler: the sampler.
        x: initial noise, (bsz, *input_shape).
        plan: from `build_plan`; cast here to x's device and dtype.
        denoise: the wrapped model.
        generator: source of the per-step noise of stochastic samplers.
        return_trajectory: return every iterate, (S + 1, bsz, *input_shape), noise first
            (after the callback's replacement, where it returns one).
        progress: show a progress bar.
        loop: a compiled step driver (see `run_loop`).
        callback: a per-step callback (see `run_loop`).

    Returns:
        (bsz, *input_shape), or the trajectory.
    """
    callbacks: list[Callback] = [] if callback is None else [callback]
    trajectory = [x] if return_trajectory else None
    if trajectory is not None:

        def record(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> None:
            trajectory.append(x_next)

    bar = progress_bar(total=plan["t"].shape[0], desc="sampling", leave=False) if progress else None
    if bar is not None:

        def tick(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> None:
            bar.update(1)

    chained = _chain(
        [
            *callbacks,
            *([record] if trajectory is not None else []),
            *([tick] if bar is not None else []),
        ]
    )
    try:
        out = run_loop(sampler, x, plan, denoise, generator=generator, callback=chained, loop=loop)
    finally:
        if bar is not None:
            bar.close()
    return torch.stack(trajectory) if trajectory is not None else out


def _chain(callbacks: list[Callback]) -> Callback | None:
    """One callback running ``callbacks`` in order, each seeing the previous replacement."""
    if not callbacks:
        return None
    if len(callbacks) == 1:
        return callbacks[0]

    def chained(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> Tensor | None:
        replaced = None
        for cb in callbacks:
            out = cb(i, t_next, x_next, x0_hat)
            if out is not None:
                x_next = replaced = _check_replacement(out, x_next, i)
        return replaced

    return chained
