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

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from tinydiff import denoiser as _denoiser
from tinydiff._progress import progress_bar
from tinydiff._registry import Registry, class_check, instantiate
from tinydiff.denoiser import Prediction
from tinydiff.process import GaussianProcess, PathValues
from tinydiff.variances import Variance

__all__ = [
    "DEFAULT_NUM_STEPS",
    "LOWER_ORDER_FINAL_STEPS",
    "PATH_DEFAULT_SAMPLER",
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
    "check_per_step",
    "check_replacement",
    "default_sampler",
    "get",
    "names",
    "per_step_values",
    "register",
    "run_loop",
    "run_sampler",
    "sampling_defaults",
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

#: the sampler of a config without ``sampler_type`` on a process that is not variance
#: preserving (rectified flow, EDM, other paths): see `default_sampler`
PATH_DEFAULT_SAMPLER = "unipc"
#: steps of a deterministic sampler when a call gives no step count (``Sampler.default_num_steps``)
DEFAULT_NUM_STEPS = 50
#: on a process that is not variance preserving, the default spacing is ``quadratic`` where
#: lambda = 0 (SNR 1) is reached before this fraction of the time range, else ``trailing``
#: (`Sampler.spacing_for`)
QUADRATIC_BELOW = 1 / 3
_SILENCE = (
    'Silence it with warnings.filterwarnings("ignore", category=FutureWarning, module="tinydiff")'
)


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
    #: float options that `tinydiff.timestep_search.optimize_timesteps(coefficients=True)` may
    #: fit per model, with the interval each may take: ``{name: (lo, hi)}``. An option named
    #: in `per_step` as well is per step: None (the exact method) or a sequence of S floats,
    #: one per sampling step, each in (lo, hi) when fitted
    tunable: ClassVar[Mapping[str, tuple[float, float]]] = {}
    #: the per-step options among `tunable`, with the value of one entry that gives the exact
    #: method (what None means for every step): ``{name: neutral}``. Such an option is
    #: validated with `check_per_step` and read in `plan` with `per_step_values`, whose
    #: length check against the number of steps happens when the times are known
    per_step: ClassVar[Mapping[str, float]] = {}
    #: a few-step sampler's own defaults (new in 0.3, so nothing changed since 0.2): with a
    #: value, a call without ``sampling_timesteps`` runs this many steps and a call without
    #: a spacing uses `default_spacing` on every process (the `spacing_for` rule is for ODE
    #: solvers); None (the default): `default_num_steps` and `spacing_for` below
    few_step_default: ClassVar[int | None] = None

    @property
    def is_stochastic(self) -> bool:
        """Whether :meth:`step` needs noise with these options."""
        return self.stochastic

    @classmethod
    def spacing_for(cls, process: GaussianProcess) -> str:
        r"""The spacing used on ``process`` when neither the call nor the config names one.

        Variance-preserving processes: `default_spacing` (tinydiff 0.2's default).
        Other processes (rectified flow, EDM, other paths), one rule for every sampler in
        terms of where the process crosses $\lambda = 0$ (signal and noise of equal
        size), at $t_0 = t(\lambda = 0)$: ``quadratic`` (denser near t = 0, its last
        nonzero level at T / S^2) when $t_0 < T/3$ (`QUADRATIC_BELOW`: most of a
        uniform grid would sit at high noise, e.g. rectified flow with shift 3, t_0 = T/4),
        else ``trailing`` (uniform in t: rectified flow with shift 1, t_0 = T/2; EDM,
        t_0 = 0.40 T, where uniform t are Karras' rho = 7 levels). Measured in
        ``benchmarks/defaults_grid.py`` (results/defaults_grid.md). Override it in a
        subclass for a sampler of your own.
        """
        if process.variance_preserving or cls.few_step_default is not None:
            return cls.default_spacing
        T = process.num_timesteps
        lo, hi = process.lam_range()
        if not lo < 0.0 < hi:  # never crosses SNR 1: nothing to place, uniform times
            return "trailing"
        t0 = float(process.time_at_lam(torch.tensor(0.0, dtype=torch.float64)))
        return "quadratic" if t0 < QUADRATIC_BELOW * T else "trailing"

    def default_num_steps(self, num_timesteps: int) -> int:
        """S when a call gives no step count: min(`DEFAULT_NUM_STEPS`, T) (50) for a
        deterministic sampler (its error at 50 steps is far below a trained network's, e.g.
        benchmarks/results/sampler_quality.md); all T steps for a stochastic one, whose
        ancestral noise converges only at order 1/2 in the step size and which tinydiff 0.2
        ran with T steps (VP models sampled with ``ddpm`` keep their samples). A few-step
        sampler (`few_step_default` set, e.g. ``flow_map``, ``consistency``): that many."""
        if self.few_step_default is not None:
            return min(self.few_step_default, num_timesteps)
        return num_timesteps if self.is_stochastic else min(DEFAULT_NUM_STEPS, num_timesteps)

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


def check_per_step(what: str, values: Sequence[float] | None) -> tuple[float, ...] | None:
    """A per-step option (`Sampler.per_step`) as a tuple of finite floats, or None.

    Args:
        what: the option's name in messages, e.g. ``"unipc correction_scale"``.
        values: None, or a list or tuple of real numbers (one per sampling step; their count
            is checked against the steps by `per_step_values`).

    Raises:
        TypeError: not None, a list or a tuple, or an entry that is not a real number.
        ValueError: empty, or an entry that is not finite.
    """
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{what} must be None or a list/tuple of floats, one per sampling step, got "
            f"{type(values).__name__} {values!r}"
        )
    if not values:
        raise ValueError(f"{what} is empty; pass one float per sampling step, or None")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{what}[{i}] must be a float, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{what}[{i}] must be finite, got {v!r}")
    return tuple(float(v) for v in values)


def per_step_values(
    name: str, values: tuple[float, ...] | None, num_steps: int
) -> tuple[float, ...] | None:
    """``values`` (from `check_per_step`) for a plan of ``num_steps`` steps.

    Raises:
        ValueError: their count is not ``num_steps``; the message says how to fix it.
    """
    if values is not None and len(values) != num_steps:
        raise ValueError(
            f"{name} has {len(values)} entries but the sampling times have {num_steps} steps: "
            f"pass one value per step (or None), e.g. sample with sampling_timesteps="
            f"{len(values)} or the times it was fitted with"
        )
    return values


def default_sampler(process: GaussianProcess, *, warn: bool = False) -> str:
    """The sampler of a config that names none (``sampler_type=None``) on ``process``:
    ``ddpm`` on a variance-preserving process (tinydiff 0.2's default everywhere), the
    deterministic `PATH_DEFAULT_SAMPLER` (``unipc``) on any other (rectified flow, EDM): on
    benchmarks/results/defaults_grid.md's exact-mixture grid it is within 1.25x of the best
    (sampler, spacing) pair in 16 of the 27 rectified-flow and EDM cells, geometric mean
    1.27x (the next best default, deis, 1.94x), where ``ddpm`` does not follow the
    probability flow at all.

    Args:
        process: the model's process.
        warn: give a FutureWarning where the answer differs from 0.2's ``ddpm`` (a sampling
            call that relies on the default changes its samples); Python shows it once per
            process kind.
    """
    if process.variance_preserving:
        return "ddpm"
    if warn:
        warnings.warn(
            f"this model's config leaves sampler_type unset, and on {process!r} (not "
            f"variance preserving) the default sampler is now {PATH_DEFAULT_SAMPLER!r} "
            "(deterministic, high order) instead of tinydiff 0.2's 'ddpm': sample() returns "
            "different samples. Keep the old with sampler_type='ddpm' in the config (or "
            f"sample(..., sampler='ddpm')); set sampler_type={PATH_DEFAULT_SAMPLER!r} to "
            f"adopt the new default and silence this. {_SILENCE}",
            FutureWarning,
            stacklevel=4,
        )
    return PATH_DEFAULT_SAMPLER


def sampling_defaults(
    sampler: Sampler,
    process: GaussianProcess,
    spacing: str | Sequence[float] | Any | None,
    num_steps: int | None,
) -> tuple[str, int | None]:
    """(default spacing, number of steps) of a sampling call, with one FutureWarning naming
    the defaults that changed since tinydiff 0.2 where the call relies on them.

    Args:
        sampler: the call's sampler.
        process: the model's process.
        spacing: the call's (or config's) spacing: a name, explicit times, or None.
        num_steps: the call's ``sampling_timesteps`` (None: `Sampler.default_num_steps`
            when the times are named, else the count of the explicit times).

    Returns:
        ``sampler.spacing_for(process)`` and the step count to pass to
        `tinydiff.spacings.resolve`.
    """
    T, name = process.num_timesteps, type(sampler).__name__
    default, steps, changes = sampler.spacing_for(process), num_steps, []
    if spacing is None and default != sampler.default_spacing:
        changes.append(
            f"with no timestep_spacing it now uses {default!r} on {process!r} (chosen per "
            f"process, see Sampler.spacing_for), not {sampler.default_spacing!r}: pass "
            f"timestep_spacing={sampler.default_spacing!r} to keep the old"
        )
    if num_steps is None and (spacing is None or isinstance(spacing, str)):
        steps = sampler.default_num_steps(T)
        if steps != T and sampler.few_step_default is None:
            changes.append(
                f"with no sampling_timesteps it now runs {steps} steps (it is deterministic), "
                f"not all T = {T}: pass sampling_timesteps={T} to keep the old"
            )
    if changes:  # one warning per call, however many defaults changed
        warnings.warn(
            f"{name}'s defaults changed since tinydiff 0.2: {'; '.join(changes)}. Name "
            f"the spacing and the number of steps to silence this. {_SILENCE}",
            FutureWarning,
            stacklevel=4,
        )
    return default, steps


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


def check_replacement(out: Any, like: Tensor, i: int, loop: str = "sampling") -> Tensor:
    """A callback's non-None return value `out` after step `i`, checked to replace `like`
    (x after the step) and cast to its device and dtype; `loop` names the loop in the
    error (sampling, inversion, posterior).

    Raises:
        ValueError: not a tensor of `like`'s shape.
    """
    if not isinstance(out, Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the {loop} callback returned {got} after step {i}; expected None (keep x) or "
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
                x_next = check_replacement(out, x_next, i)
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
                x_next = replaced = check_replacement(out, x_next, i)
        return replaced

    return chained
