r"""Sampling times chosen for one model and one sampler: :func:`optimize_timesteps`.

The error of a few-step sampler depends mostly on *where* it steps, and the best places
depend on the model (where its denoiser changes fast) and on the solver (its local error
and how it uses history). Instead of a fixed spacing, this module searches the S - 1 free
interior times directly, so that the S-step solution from a batch of noise lands close to
an accurate reference solution from the same noise:

.. math::
    \min_{T = t_0 > t_1 > \dots > t_{S-1} > t_S = 0}\;
    \Big(\frac1n\sum_{k=1}^n \big\|\Phi_{t_{0:S}}(z_k) - x^{\mathrm{ref}}(z_k)\big\|^2\Big)^{1/2},

with :math:`\Phi` the sampler run on those times (any registered sampler, multistep ones
included: the whole trajectory is scored, not step by step) and :math:`x^{\mathrm{ref}}`
a fine solution (``reference_steps`` steps of ``reference_sampler``). This is the
objective of "Optimal Stepsize for Diffusion Sampling" (Pei et al. 2025) and, in spirit, of
GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling"),
which both fit the time steps to a teacher trajectory; GITS does it by dynamic programming
over a candidate grid with a *local* (one-step) cost, which is exact only for single-step
solvers. Scoring the full S-step run instead works for multistep solvers too, at the price
of a derivative-free search: a coordinate pattern search in
:math:`\lambda = \log(\alpha/\sigma)` (half the log-SNR, read from the model's process),

1. start from the best registered spacing on this batch (so the result is never worse on
   it than any built-in spacing);
2. for each interior time in turn, try moving its lambda up and down by its own step size,
   staying between its neighbours and within [lambda(T), lambda(t_min)] (times come back
   through the process's exact inverse
   `tinydiff.process.GaussianProcess.time_at_lam`); keep a move that lowers the error
   and enlarge that step (x 1.5), otherwise halve it;
3. stop when every step size is below ``tol`` or after ``max_evals`` runs; ``tol`` is stated
   in full log-SNR :math:`\log(\alpha^2/\sigma^2) = 2\lambda`, so the search stops at steps
   below ``tol / 2`` in lambda.

With ``coefficients=True`` the sampler's tunable coefficients are fitted next, at the times
the held-out selection chose, by the same whole-run objective and held-out selection: scalars such as unipc's
``last_step_blend``, and per-step ones (`tinydiff.samplers.Sampler.per_step`) such as unipc's
``correction_scale``, one weight per step on the step's higher-order terms. Fitting a
solver's per-step coefficients to a fine solution is the idea of PAS (Wang et al. 2024,
"Diffusion Sampling Correction via Approximately 10 Parameters"), S4S (Frankel et al. 2025,
"S4S: Solving for a Diffusion Model Solver") and Bespoke solvers (Shaul et al. 2024), and
in spirit of DPM-Solver-v3's empirical model statistics (Zheng et al. 2023); they fit by
gradients or least squares, tinydiff by a derivative-free coordinate search on the whole
run, which needs nothing of the sampler but its options.

Stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``, ``dpmpp_2m_sde``) have no
pathwise limit to compare with, so for them the error is the sliced Wasserstein-2 distance
between their samples (the same per-step noise in every run: common random numbers) and
the reference samples.

Align Your Steps (Sabour et al. 2024) optimises a KL-divergence bound by gradients through
the solver instead; it needs differentiable solver coefficients, which tinydiff's float64
plans deliberately are not.

Everything goes through the public :class:`~tinydiff.DiffusionModel` API (``sample`` with
explicit times, ``make_sampler``, ``sampling_timesteps``, ``alpha_bar``), so any process,
target, conditioning and guidance works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinydiff import samplers, spacings
from tinydiff._progress import progress_bar
from tinydiff._validation import dtype_device, in_eval_mode

if TYPE_CHECKING:
    from tinydiff.denoiser import ModelLike as DiffusionModel
    from tinydiff.process import GaussianProcess
    from tinydiff.samplers.base import Sampler

__all__ = ["BUDGETS", "TimestepSearchResult", "optimize_timesteps"]


@dataclass(frozen=True)
class TimestepSearchResult:
    """What :func:`optimize_timesteps` found, and what it cost.

    Attributes:
        timesteps: float64 (S + 1,), strictly decreasing from T to exactly 0; pass them as
            ``sample(..., timestep_spacing=timesteps)`` or store them in the config.
        error: the objective (per-sample distances to the reference pooled by
            ``objective``, or sliced W2 for stochastic samplers) of ``timesteps`` on the
            held-out part of the batch (the whole batch with ``holdout=0``).
        search_error: the same on the part of the batch the search moved on.
        start_spacing: the registered spacing the search started from (the best on the batch).
        spacing_errors: the objective of every registered spacing on the search part.
        evaluations: sampler runs of S steps made by the search.
        network_calls: network calls in all, the reference included (each on
            ``num_samples`` rows; twice that with guidance).
        history: the best error on the search part after each evaluation (with
            ``coefficients``, the coefficient search restarts from the chosen times' error,
            so the history may rise once there).
        sampler: the sampler the times are for (a registered name).
        sampler_kwargs: its options to sample with: the ones given, with the fitted
            coefficients when ``coefficients=True``. Pass both with the times:
            ``model.sample(n, S, sampler=r.sampler, sampler_kwargs=r.sampler_kwargs,
            timestep_spacing=r.timesteps)`` (or store all three in the config).
    """

    timesteps: Tensor
    error: float
    search_error: float
    start_spacing: str
    spacing_errors: dict[str, float]
    evaluations: int
    network_calls: int
    history: list[float] = field(repr=False)
    sampler: str = ""
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)


#: the smallest gap in lambda between neighbouring times that a move may leave (5e-7: 1e-6 in
#: full log-SNR)
_MIN_GAP = 5e-7

#: the coefficient search (after the times'): at most this many runs per coefficient, until
#: its step is below _COEF_TOL of its range
_COEF_EVALS = 16
_COEF_TOL = 0.01
#: the same per entry of a per-step coefficient (`Sampler.per_step`): S entries cost at most
#: S times this many runs
_STEP_COEF_EVALS = 8

#: the error of a run is the power mean (mean of d^p)^(1/p) of the per-sample distances d:
#: "mean" (p = 1) is robust (a few samples that switch modes do not dominate), "rms" is p = 2
_OBJECTIVES = {"mean": 1, "rms": 2}


def _lam_at_t_min(process: GaussianProcess, t_min: float) -> float:
    """lambda(t_min), checking that t_min is a time in (0, T) with finite lambda."""
    T = process.num_timesteps
    ok = isinstance(t_min, (int, float)) and not isinstance(t_min, bool) and 0 < t_min < T
    lam = float(process.lam(float(t_min))) if ok else math.nan
    if not math.isfinite(lam):
        raise ValueError(
            f"t_min must be a time in (0, {T}) with a finite noise level lambda = log(alpha / "
            f"sigma), got t_min={t_min!r}; leave it None for the default"
        )
    return lam


def _sliced_w2(x: Tensor, y: Tensor, num_proj: int = 64) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = x.reshape(x.shape[0], -1).double().cpu(), y.reshape(y.shape[0], -1).double().cpu()
    dirs = torch.randn(x.shape[1], num_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(0)
    py, _ = (y @ dirs).sort(0)
    return float(((px - py) ** 2).mean(0).sum().sqrt())


@in_eval_mode
def optimize_timesteps(
    model: DiffusionModel,
    num_steps: int,
    *,
    sampler: str | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    cond: dict[str, Any] | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
    reference_steps: int | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_spacing: str = "logsnr_trailing",
    max_evals: int | None = None,
    tol: float = 0.02,
    t_min: float | None = None,
    objective: str = "mean",
    holdout: float = 0.25,
    use_ema: bool = False,
    progress: bool = False,
    return_info: bool = False,
    budget: str = "default",
    coefficients: bool | Sequence[str] = False,
) -> Tensor | TimestepSearchResult:
    """Sampling times for ``model`` and ``sampler`` with ``num_steps`` steps.

    See the module docstring for the method. The times are float64, start at T (where the
    sampler's initial noise lives), decrease strictly and end at 0; they work with
    ``model.sample(..., timestep_spacing=times)``, ``compile=True`` (no recompilation: only
    the plan's values change) and ``DiffusionModelConfig(timestep_spacing=tuple(times))``.

    Args:
        model: the model (its network, process and target are used as they are).
        num_steps: S, the number of sampling steps (>= 2; S = 1 has no free time).
        sampler: a registered sampler name (default: the config's).
        sampler_kwargs: its options (default: the config's, for its sampler).
        cond: network keyword arguments for the batch, tensors with leading dim
            ``num_samples`` (guided or conditional sampling has its own best times).
        guidance_scale: classifier-free guidance scale (needs ``cond``).
        generator: source of the batch of initial noise (and the fixed per-step noise of
            stochastic samplers); on the model's device.
        num_samples: the batch the error is measured on (the sample budget; default: the
            ``budget``'s).
        reference_steps: steps of the reference solution (default: the ``budget``'s; 1000 in
            ``"default"``: on a trained 2-d MLP, 500
            steps of dpmpp_3m were still 5e-3 from 1000, a third of the error at S = 20;
            benchmarks/timestep_search_cost.py).
        reference_sampler: the sampler of the reference solution (a deterministic one).
        reference_spacing: its spacing.
        max_evals: the most S-step runs the search may make (the run budget; default: the
            ``budget``'s).
        tol: stop when every step of the pattern search is below this, in full log-SNR
            log(alpha^2 / sigma^2) (= 2 lambda).
        objective: how per-sample distances d_k to the reference are pooled: ``"mean"``
            (default; robust: on sharp multi-modal data a few samples near a boundary
            between modes switch modes under any small error and would dominate a mean of
            squares, so that the search would chase them) or ``"rms"``.
        holdout: the fraction of the batch held out of the search: moves are chosen on the
            rest, and the times returned are, among the moves the search accepted, the one
            with the lowest error on the held-out part that beats the start there by two
            standard errors of the paired per-sample difference, or else the start (early
            stopping; without it the search fits the mode switches of its own samples on
            sharp multi-modal data). 0 scores and selects on the whole batch.
        t_min: the smallest nonzero time allowed (default: the smallest last nonzero time
            of the registered spacings, but not below the process's smallest trained time
            `tinydiff.process.GaussianProcess.t_min`; t = 1 for discrete VP).
        use_ema: score the EMA weights.
        progress: show a progress bar over the runs.
        return_info: return a :class:`TimestepSearchResult` instead of the times.
        coefficients: also fit the sampler's tunable coefficients (`Sampler.tunable`) with
            the times: True for all of them, or a list of option names (e.g.
            ``["last_step_blend"]``). unipc has a scalar ``last_step_blend`` (the last step to
            sigma = 0) and a per-step ``correction_scale`` (`Sampler.per_step`: S floats, the
            weight of each step's higher-order terms, as in PAS, Wang et al. 2024, and S4S,
            Frankel et al. 2025, which fit a solver's per-step coefficients to a teacher
            trajectory). After the time search, the coefficients are fitted at the chosen
            times (held-out selection) by a round-robin coordinate search (each coordinate, a scalar or one
            step's entry, moves up or down by its step, starting from a quarter of its range;
            a step grows x 1.5 on a gain, halves otherwise), scored like the times on the
            whole S-step run, with the same held-out selection: the returned times and
            coefficients are the start or an accepted move with the lowest held-out error
            that beats the start significantly, so the result is never worse there than the
            best built-in spacing nor than the times alone. It costs at most 16 runs of S steps
            per scalar and 8 per step of a per-step option (an entry that changes nothing,
            like unipc's last step, is closed after one run): for unipc, ``16 + 8 S`` runs,
            i.e. ``(16 + 8 S) * S`` network calls more. Needs ``return_info=True``; sample with
            ``result.sampler_kwargs`` (JSON-ready: floats and lists of floats) and the times,
            directly, through the config, ``save_pretrained`` / ``from_pretrained`` or
            compiled. A sampler with nothing tunable raises ValueError.
        budget: the defaults of ``num_samples``, ``reference_steps`` and ``max_evals``
            (arguments given explicitly win), see `BUDGETS`. The cost in network calls, each on
            ``num_samples`` rows (twice that with guidance), is at most
            ``reference_steps`` (the 3rd-order reference: one call per step)
            ``+ (8 + max_evals) * S * nfe`` (the 8 registered spacings tried first, then the
            search; ``nfe`` calls per step, 1 for every built-in but ``heun``), plus the
            coefficient runs with ``coefficients`` (above):
            - ``"default"`` (512 samples, 1000 reference steps, 400 runs): at S = 20 up to
              9160 calls of 512 rows; about half an hour on 2 CPU cores for the guided 8x8
              digits UNet of ``examples/digits_cfg.py``, seconds for a 2-d MLP;
            - ``"fast"`` (64 samples, 100 reference steps, 40 runs): at S = 20 up to 1060
              calls of 64 rows, 1/70 of the default's work (`benchmarks/timestep_search_cost.py`
              times it on the digits UNet); noisier, so its held-out check more often keeps
              the best built-in spacing.

    Returns:
        float64 (S + 1,) times, or the :class:`TimestepSearchResult`.

    Raises:
        ValueError: num_steps < 2 or above T, a stochastic reference sampler, bad budgets.
    """
    num_samples, reference_steps, max_evals = _budget(
        budget, num_samples, reference_steps, max_evals
    )
    coefficients = _check_coefficients(coefficients)
    _check_args(
        model, num_steps, num_samples, max_evals, reference_steps, t_min, objective, holdout
    )
    if coefficients and not return_info:
        raise ValueError(
            "coefficients=True fits sampler options that the times need: pass "
            "return_info=True and sample with result.sampler_kwargs and result.timesteps"
        )
    common = {"cond": cond, "guidance_scale": guidance_scale, "use_ema": use_ema}
    ref, solver = (reference_sampler, reference_spacing, reference_steps), (sampler, sampler_kwargs)
    runs = _Runs.prepare(model, num_steps, solver, ref, generator, num_samples, common)
    tuned = _tunable(runs, coefficients)
    search = _PatternSearch.start(
        _Scorer.of(runs, objective, holdout),
        t_min,
        tol / 2,
        tuned,  # tol in 2 lambda
    )
    result = search.run(max_evals, progress)
    return result if return_info else result.timesteps


#: ``optimize_timesteps(budget=...)``: (num_samples, reference_steps, max_evals)
BUDGETS: dict[str, tuple[int, int, int]] = {"default": (512, 1000, 400), "fast": (64, 100, 40)}


def _budget(
    budget: str, num_samples: int | None, reference_steps: int | None, max_evals: int | None
) -> tuple[int, int, int]:
    """The budget's (num_samples, reference_steps, max_evals), where not given explicitly."""
    if not isinstance(budget, str) or budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    preset = BUDGETS[budget]
    given = (num_samples, reference_steps, max_evals)
    out = tuple(p if g is None else g for g, p in zip(given, preset, strict=True))
    for name, value in zip(("num_samples", "reference_steps", "max_evals"), out, strict=True):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    return out  # type: ignore[return-value]


def _check_coefficients(coefficients: Any) -> bool | tuple[str, ...]:
    """``coefficients`` as a bool or a tuple of option names."""
    if isinstance(coefficients, bool):
        return coefficients
    if isinstance(coefficients, (list, tuple)) and all(isinstance(c, str) for c in coefficients):
        return tuple(coefficients)
    raise TypeError(
        f"coefficients must be a bool or a list/tuple of tunable option names, got {coefficients!r}"
    )


def _tunable(runs: _Runs, coefficients: bool | tuple[str, ...]) -> dict[str, Any]:
    """``{option: (start value, lo, hi)}`` of the coefficients to fit (empty unless asked); the
    start of a per-step option (`Sampler.per_step`) is a list of S floats (the given ones, or
    the exact method's neutral value at every step)."""
    if not coefficients:
        return {}
    solver = runs.solver
    if not solver.tunable:
        raise ValueError(
            f"sampler {runs.sampler!r} has no tunable coefficients (Sampler.tunable); samplers "
            "with some: " + ", ".join(n for n in samplers.names() if samplers.get(n).tunable)
        )
    names = list(coefficients) if isinstance(coefficients, tuple) else list(solver.tunable)
    unknown = [n for n in names if n not in solver.tunable]
    if unknown:
        raise ValueError(
            f"coefficients names {unknown!r}, not tunable coefficients of sampler "
            f"{runs.sampler!r}; its tunable ones: {sorted(solver.tunable)}"
        )
    out: dict[str, Any] = {}
    for name in names:
        lo, hi = solver.tunable[name]
        value = getattr(solver, name)
        if name in solver.per_step:
            if value is not None and len(value) != runs.num_steps:
                raise ValueError(
                    f"sampler_kwargs {name} has {len(value)} entries, expected num_steps = "
                    f"{runs.num_steps} (one per step) or None"
                )
            neutral = float(solver.per_step[name])
            start = [neutral] * runs.num_steps if value is None else [float(v) for v in value]
            out[name] = (start, float(lo), float(hi))
        else:
            out[name] = (float(value), float(lo), float(hi))
    return out


def _check_args(
    model: DiffusionModel,
    num_steps: int,
    num_samples: int,
    max_evals: int,
    reference_steps: int,
    t_min: float | None,
    objective: str,
    holdout: float,
) -> None:
    """The checks of `optimize_timesteps` that need no sampler run."""
    T = model.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 2 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in 2..{T}, got {num_steps!r}")
    if num_samples < 1 or max_evals < 1 or reference_steps < num_steps:
        raise ValueError(
            f"need num_samples >= 1, max_evals >= 1 and reference_steps >= num_steps; got "
            f"{num_samples}, {max_evals}, {reference_steps}"
        )
    if t_min is not None:
        _lam_at_t_min(model.process, t_min)  # before the costly runs
    _check_scoring(objective, holdout, num_samples)


def _check_scoring(objective: str, holdout: float, num_samples: int) -> int:
    """Check ``objective`` and ``holdout``; the number of held-out samples."""
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)}, got {objective!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a float in [0, 1), got {holdout!r}")
    num_held = round(holdout * num_samples)
    if holdout > 0 and not 1 <= num_held < num_samples:
        raise ValueError(
            f"holdout={holdout} of num_samples={num_samples} leaves no sample on one side"
        )
    return num_held


@dataclass
class _Runs:
    """S-step runs of one sampler from one batch of noise ``z``, and the reference solution
    from the same noise; ``calls`` counts the network calls made, the reference's included."""

    model: DiffusionModel
    num_steps: int
    sampler: str
    sampler_kwargs: dict[str, Any] | None
    solver: Sampler
    stochastic: bool
    common: dict[str, Any]
    device: torch.device
    z: Tensor
    noise_seed: int
    reference: Tensor
    per_run: int
    calls: int

    @classmethod
    def prepare(
        cls,
        model: DiffusionModel,
        num_steps: int,
        sampler: tuple[str | None, dict[str, Any] | None],
        reference: tuple[str, str, int],
        generator: torch.Generator | None,
        num_samples: int,
        common: dict[str, Any],
    ) -> _Runs:
        """Check the samplers, draw the batch of noise (then the seed of the per-step noise of
        stochastic samplers) and run the reference (sampler, spacing, steps) from it."""
        name, kwargs = sampler
        solver = model.make_sampler(name, kwargs)
        if kwargs is None:
            kwargs = model.config.sampler_kwargs if name is None else {}
        name = model.config.sampler_name(model.process) if name is None else name
        ref_sampler, ref_spacing, ref_steps = reference
        ref_solver = model.make_sampler(ref_sampler, {})
        if ref_solver.is_stochastic:
            raise ValueError(f"reference_sampler must be deterministic, got {ref_sampler!r}")
        dtype, device = dtype_device(model.nn_module)
        z = torch.randn(
            (num_samples, *model.input_shape), generator=generator, device=device, dtype=dtype
        )
        noise_seed = int(
            torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
            if generator is not None
            else torch.randint(0, 2**62, (1,)).item()
        )
        calls = ref_solver.nfe(ref_steps)
        ref = model.sample(
            num_samples,
            ref_steps,
            sampler=ref_sampler,
            sampler_kwargs={},
            timestep_spacing=ref_spacing,
            init_noise=z,
            **common,
        ).to(torch.float64)
        per_run = solver.nfe(num_steps)
        return cls(
            model=model,
            num_steps=num_steps,
            sampler=name,
            sampler_kwargs=kwargs,
            solver=solver,
            stochastic=solver.is_stochastic,
            common=common,
            device=device,
            z=z,
            noise_seed=noise_seed,
            reference=ref,
            per_run=per_run,
            calls=calls,
        )

    def run(self, times: Tensor, options: dict[str, Any] | None = None) -> Tensor:
        """The S-step solution on ``times`` (with ``options`` over the sampler's) from ``z``,
        float64 (stochastic samplers draw the same per-step noise in every run: common
        random numbers)."""
        run_gen = None
        if self.stochastic:
            run_gen = torch.Generator(device=self.device).manual_seed(self.noise_seed)
        self.calls += self.per_run
        return self.model.sample(
            self.z.shape[0],
            self.num_steps,
            sampler=self.sampler,
            sampler_kwargs={**(self.sampler_kwargs or {}), **(options or {})},
            timestep_spacing=times,
            init_noise=self.z,
            generator=run_gen,
            **self.common,
        ).to(torch.float64)


@dataclass(frozen=True)
class _Scorer:
    """The error of a run: its per-sample distances to the reference pooled by ``objective``
    (sliced W2 for stochastic samplers) on the search part ``fit`` of the batch and on the
    held-out part ``held`` (the whole batch when nothing is held out)."""

    runs: _Runs
    power: int
    fit: slice
    held: slice
    num_held: int

    @classmethod
    def of(cls, runs: _Runs, objective: str, holdout: float) -> _Scorer:
        """Split the batch by ``holdout`` (checked by `_check_scoring`)."""
        num_samples = runs.z.shape[0]
        num_held = _check_scoring(objective, holdout, num_samples)
        fit = slice(0, num_samples - num_held)
        held = slice(num_samples - num_held, num_samples) if num_held else fit
        return cls(runs, _OBJECTIVES[objective], fit, held, num_held)

    def error_of(
        self, times: Tensor, options: dict[str, Any] | None = None
    ) -> tuple[float, float, Tensor | None]:
        """(error on the search part, error on the held-out part, the held-out per-sample
        terms the error averages: distances, or squared distances for "rms"; None for
        stochastic samplers) of one run."""
        out, reference = self.runs.run(times, options), self.runs.reference
        terms = None
        if self.runs.stochastic:
            values = [_sliced_w2(out[part], reference[part]) for part in (self.fit, self.held)]
        else:
            per_sample = (out - reference).reshape(out.shape[0], -1).norm(dim=1) ** self.power
            values = [
                float(per_sample[part].mean() ** (1 / self.power)) for part in (self.fit, self.held)
            ]
            terms = per_sample[self.held]
        fit_err, held_err = (v if math.isfinite(v) else math.inf for v in values)
        return fit_err, held_err, terms

    def significantly_better(self, terms: Tensor | None, than: Tensor | None) -> bool:
        """A paired test on the held-out samples: the mean change of the per-sample terms
        is below zero by two standard errors (no test without a held-out part, or for
        stochastic samplers, whose samples do not pair)."""
        if not self.num_held or terms is None or than is None or self.num_held < 2:
            return True
        diff = terms - than
        if not bool(torch.isfinite(diff).all()):
            return False
        return float(diff.mean() + 2 * diff.std() / math.sqrt(self.num_held)) < 0


@dataclass(frozen=True)
class _Scored:
    """One candidate times: its error on the search part, on the held-out part, and the
    held-out per-sample terms (`_Scorer.error_of`)."""

    times: Tensor
    fit: float
    held: float
    terms: Tensor | None


def _score_spacings(scorer: _Scorer) -> dict[str, _Scored]:
    """Every registered spacing that starts at T, scored (the starting points)."""
    model, T = scorer.runs.model, scorer.runs.model.num_timesteps
    scored: dict[str, _Scored] = {}
    for name in spacings.names():
        times = model.sampling_timesteps(scorer.runs.num_steps, name, sampler=scorer.runs.sampler)
        if float(times[0]) != float(T):  # starts below T: x_T would be at the wrong level
            continue
        scored[name] = _Scored(times, *scorer.error_of(times))
    if not scored:
        raise ValueError("no registered spacing starts at t = T to start the search from")
    return scored


@dataclass(frozen=True)
class _Box:
    """Where the interior lambdas may move: decreasing in time, strictly between
    lam_top = lambda(T) (-inf when alpha(T) = 0) and lam_hi = lambda(t_min) (the least noisy
    level allowed), neighbours at least _MIN_GAP apart."""

    process: GaussianProcess
    T: float
    t_min: float
    lam_top: float
    lam_hi: float

    def with_ends(self, lam: Tensor) -> Tensor:
        """lam with lam_top before it and lam_hi after it."""
        return torch.cat([lam.new_tensor([self.lam_top]), lam, lam.new_tensor([self.lam_hi])])

    def times_of(self, lam: Tensor) -> Tensor:
        """The S + 1 times from T to 0 with these interior lambdas."""
        t = self.process.time_at_lam(lam).clamp(self.t_min, self.T)
        return torch.cat([t.new_tensor([self.T]), t, t.new_zeros(1)])

    def feasible(self, lam: Tensor) -> bool:
        full = self.with_ends(lam)
        if not bool((torch.diff(full[:-1]) > _MIN_GAP).all()) or float(lam[-1]) > self.lam_hi:
            return False
        t = self.times_of(lam)
        return bool((t[1:] < t[:-1]).all())


class _PatternSearch:
    """Steps 2 and 3 of the module docstring: the coordinate pattern search in lambda from the
    best registered spacing, and the choice of the times to return (``holdout``)."""

    def __init__(
        self,
        scorer: _Scorer,
        scored: dict[str, _Scored],
        start: str,
        box: _Box,
        tol_lam: float,
        tuned: dict[str, tuple[Any, float, float]] | None = None,
    ) -> None:
        self.scorer, self.box, self.tol_lam = scorer, box, tol_lam
        self.scored, self.start_spacing = scored, start
        first = scored[start]
        self.best_times, self.best = first.times, first.fit
        # the returned times: the start, or the accepted move with the lowest held-out error
        # among those significantly better than the start there
        self.chosen_times, self.chosen, self.chosen_fit = first.times, first.held, first.fit
        self.start_terms = first.terms
        self.history = [self.best]
        self.evals = 0
        self.lam = box.process.lam(first.times[1:-1]).clamp(max=box.lam_hi)
        gaps = torch.diff(box.with_ends(self.lam))
        self.step = (0.5 * torch.minimum(gaps[:-1], gaps[1:])).clamp_min(4 * tol_lam)
        # the sampler's coefficients, fitted after the times: value, range, step (a quarter of
        # the range at first) per coordinate (name, None) of a scalar or (name, i) of entry i
        # of a per-step option; the chosen ones go with the chosen times
        self.bounds = {k: (lo, hi) for k, (_, lo, hi) in (tuned or {}).items()}
        self.coef: dict[str, Any] = {k: v for k, (v, _, _) in (tuned or {}).items()}
        self.coords: list[tuple[str, int | None]] = [
            coord
            for k, v in self.coef.items()
            for coord in ([(k, i) for i in range(len(v))] if isinstance(v, list) else [(k, None)])
        ]
        self.coef_step = {
            c: 0.25 * (self.bounds[c[0]][1] - self.bounds[c[0]][0]) for c in self.coords
        }
        self.chosen_coef = _copy_coef(self.coef)
        self.last_fit = math.inf

    @classmethod
    def start(
        cls,
        scorer: _Scorer,
        t_min: float | None,
        tol_lam: float,
        tuned: dict[str, tuple[Any, float, float]] | None = None,
    ) -> _PatternSearch:
        """Step 1: start from the best registered spacing, in the box above ``t_min`` (default:
        the smallest last nonzero time of the spacings, but not below the process's smallest
        trained time)."""
        scored = _score_spacings(scorer)
        start = min(scored, key=lambda k: scored[k].fit)
        model = scorer.runs.model
        process, T = model.process, model.num_timesteps
        if t_min is None:
            t_min = max(process.t_min, min(float(s.times[-2]) for s in scored.values()))
        lam_hi = _lam_at_t_min(model.process, t_min)
        lam_top = float(process.lam(float(T)))
        box = _Box(process, float(T), t_min, lam_top, lam_hi)
        return cls(scorer, scored, start, box, tol_lam, tuned)

    def run(self, max_evals: int, progress: bool) -> TimestepSearchResult:
        """Sweep the interior times until every step is below tol or the budget is spent,
        then fit the coefficients (if any) at the chosen times."""
        extra = sum(_COEF_EVALS if i is None else _STEP_COEF_EVALS for _, i in self.coords)
        bar = progress_bar(
            total=max_evals + extra, enabled=progress, desc="optimizing timesteps", leave=False
        )
        try:
            while self.evals < max_evals and bool((self.step > self.tol_lam).any()):
                for i in range(self.lam.numel()):
                    if self.evals >= max_evals:
                        break
                    if float(self.step[i]) <= self.tol_lam:
                        continue
                    improved = self._move(i, max_evals, bar)
                    self.step[i] = self.step[i] * (1.5 if improved else 0.5)
            budget = self.evals + extra
            # the coefficients start from the times the held-out selection chose (the start or
            # a validated move), not from the best times on the search part, which may fit
            # that part's samples: moves are then judged against a validated state
            self.best_times, self.best = self.chosen_times, self.chosen_fit
            self.coef = _copy_coef(self.chosen_coef)

            # coordinate descent, round robin over the coefficients (coupled through the
            # trajectory), each round one move per coordinate whose step is above tolerance
            def open_coords() -> list[tuple[str, int | None]]:
                return [
                    c
                    for c in self.coords
                    if self.coef_step[c] > _COEF_TOL * (self.bounds[c[0]][1] - self.bounds[c[0]][0])
                ]

            while self.evals < budget and (todo := open_coords()):
                for coord in todo:
                    if self.evals >= budget:
                        break
                    improved = self._move_coef(coord, budget, bar)
                    self.coef_step[coord] *= 1.5 if improved else 0.5
        finally:
            bar.close()
        return self.result()

    def _move(self, i: int, max_evals: int, bar: Any) -> bool:
        """Try lambda_i up, then down, by its step; keep the first move that lowers the error."""
        for sign in (1.0, -1.0):
            trial = self.lam.clone()
            trial[i] = trial[i] + sign * self.step[i]
            if not self.box.feasible(trial):
                continue
            if self._try(self.box.times_of(trial), self.coef, bar):
                self.lam = trial
                return True
            if self.evals >= max_evals:
                return False
        return False

    def _move_coef(self, coord: tuple[str, int | None], max_evals: int, bar: Any) -> bool:
        """The same for one coefficient (or one entry of a per-step one), within its range; an
        entry whose move leaves the error exactly unchanged (a step it does not act on, e.g.
        unipc's last step to sigma = 0) is closed."""
        name, i = coord
        lo, hi = self.bounds[name]
        for sign in (1.0, -1.0):
            current = self.coef[name] if i is None else self.coef[name][i]
            value = current + sign * self.coef_step[coord]
            if not lo <= value <= hi:
                continue
            trial = _copy_coef(self.coef)
            if i is None:
                trial[name] = value
            else:
                trial[name][i] = value
            if self._try(self.best_times, trial, bar):
                self.coef = trial
                return True
            if self.last_fit == self.best:  # no effect at all: nothing to fit here
                self.coef_step[coord] = 0.0
                return False
            if self.evals >= max_evals:
                return False
        return False

    def _try(self, times: Tensor, coef: dict[str, Any], bar: Any) -> bool:
        """Score one candidate; keep it as the best (and maybe the chosen) if it is better."""
        value, value_held, terms = self.scorer.error_of(times, coef)
        self.last_fit = value
        self.evals += 1
        bar.update(1)
        improved = value < self.best
        if improved:
            self.best, self.best_times = value, times
            if value_held <= self.chosen and self.scorer.significantly_better(
                terms, self.start_terms
            ):
                self.chosen_times, self.chosen, self.chosen_fit = times, value_held, value
                self.chosen_coef = _copy_coef(coef)
        self.history.append(self.best)
        return improved

    def result(self) -> TimestepSearchResult:
        """The chosen times (validated, float64) and what the search cost."""
        model = self.scorer.runs.model
        return TimestepSearchResult(
            timesteps=model.sampling_timesteps(
                None, self.chosen_times, sampler=self.scorer.runs.sampler
            ),
            error=self.chosen,
            search_error=self.chosen_fit,
            start_spacing=self.start_spacing,
            spacing_errors={name: s.fit for name, s in self.scored.items()},
            evaluations=self.evals,
            network_calls=self.scorer.runs.calls,
            history=self.history,
            sampler=self.scorer.runs.sampler,
            sampler_kwargs={**(self.scorer.runs.sampler_kwargs or {}), **self.chosen_coef},
        )


def _copy_coef(coef: dict[str, Any]) -> dict[str, Any]:
    """A copy of coefficient values (per-step ones are lists: copied too)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in coef.items()}
