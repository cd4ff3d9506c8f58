r"""Editing real samples: SDEdit (img2img) and inversion of a deterministic sampler.

**SDEdit** (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"): noise a given sample x to the level of an intermediate time t,
$x_t = \alpha(t)\,x + \sigma(t)\,z$, and run the sampler from there to t = 0. With
`strength` s and S steps, the last $k = \lfloor sS \rfloor$ steps of the S-step
spacing are run (diffusers' img2img convention): s = 1 is sampling from
$\alpha(T)x + \sigma(T)z$, s = 0 returns x. `sdedit_start` turns (times, x, s) into
the tail of the times and the noised start; `model.sample(..., x_start=x, strength=s)`
uses it.

**Inversion** finds x_T such that sampling from it with a deterministic sampler gives back a
given x (DDIM inversion, Song et al. 2021, sec. 4.3; Mokady et al. 2023). `invert` runs
the sampler's own scheme forward in time: the probability-flow ODE from t = 0 up to
`times[0]` is the ODE of the *mirrored* process (alpha and sigma swapped, time reversed:
$\alpha'(T - t) = \sigma(t)$, $\sigma'(T - t) = \alpha(t)$, so
$\lambda' = -\lambda$) with the roles of the two predictions swapped (its data
prediction is the noise prediction $\hat\epsilon$). Any sampler's plan built on the
mirrored process is therefore a solver of the inversion ODE of the same order: DPM-Solver++(2M)
becomes the second-order multistep inversion with its history taken from the lower noise
levels already visited (as diffusers' DPMSolverMultistepInverseScheduler does), and so on for
UniPC, DEIS and registered multistep plugins.

A sampler without history (DDIM, Euler, Heun: `init_state` holds nothing) maps each
$x_k$ to $x_{k+1} = F_k(x_k)$, and is inverted step by step instead: from the DDIM
inversion with the last noise prediction, $z = \frac{\alpha_k}{\alpha_{k+1}}x_{k+1} +
(\sigma_k - \frac{\alpha_k\sigma_{k+1}}{\alpha_{k+1}})\hat\epsilon_{\rm last}$, one
fixed-point iteration of $F_k(z) = x_{k+1}$,
$z \leftarrow z + \frac{\alpha_k}{\alpha_{k+1}}(x_{k+1} - F_k(z))$ (exact for a noise
prediction that is constant over the step). Its local error is a factor h smaller than
evaluating the noise at the lower level (diffusers' DDIMInverseScheduler evaluates it at
$(x_{k+1}, t_k)$), at the same one call per step.

Two steps of the mirrored run need care because lambda is infinite there:

* the first step leaves t = 0, where $\sigma = 0$ and the noise prediction is
  undefined (its posterior mean is 0). The last sampling step maps $x_{S-1}$ to
  $D(x_{S-1}, t_{S-1})$, so its inverse solves
  $x_{S-1} = \alpha_{S-1}x + \sigma_{S-1}\hat\epsilon(x_{S-1})$; one fixed-point iteration
  from $\alpha_{S-1}x$ gives
  $x_{S-1} = \alpha_{S-1}x + \sigma_{S-1}\hat\epsilon(\alpha_{S-1}x, t_{S-1})$;
* the last step reaches $\alpha(t_0) = 0$ on processes with zero terminal SNR (e.g.
  rectified flow), where the sampler's first step is
  $x_1 = \frac{\sigma_1}{\sigma_0}x_T + \alpha_1 D_T$ with $D_T$ independent of
  $x_T$: it is inverted exactly, $x_T = \frac{\sigma_0}{\sigma_1}(x_1 - \alpha_1 D_T)$.

**Refinement** (`fixed_point_iters` = k > 0): the round trip $R = \Phi\circ\Psi$
(sample after invert) differs from the identity by the solvers' discretisation errors.
Fixed-point iteration on the target, $y_0 = x$, $y_{j+1} = y_j + (x - \Phi(\Psi(y_j)))$
(defect correction; cf. the fixed-point inversions of Pan et al. 2023 and Garibi et al. 2024,
here over the whole trajectory, so that multistep samplers, whose step depends on noisier
iterates not yet known during inversion, are refined as well): a fixed point satisfies
$\Phi(\Psi(y)) = x$ exactly, and each iteration shrinks the round-trip error by the
Lipschitz constant of $R - I$, of the order of the solvers' error. Where it does not contract
(samples whose trajectory passes near the boundary between sharp modes, where sampling is
ill-conditioned), each sample keeps the candidate $\Psi(y_j)$ of least measured round-trip
error, so refinement never makes a sample's round trip worse. It works with any deterministic
sampler.

Network calls, with N = `sampler.nfe(S)` (S for one-call samplers, 2S for Heun):
`invert` makes at most N calls; with k > 0 refinement iterations, (2k + 2) N (each iteration
one sampling and one inversion pass, plus one sampling pass measuring the last candidate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tinydiff import _validation, conditioning, samplers, sampling
from tinydiff._compile import CompileOptions, StepCache
from tinydiff._progress import progress_bar
from tinydiff.denoiser import Denoiser, ModelLike
from tinydiff.guidance import Guidance
from tinydiff.guidance import resolve as resolve_guidance
from tinydiff.process import GaussianProcess, PathValues, Point
from tinydiff.samplers.base import Callback, Prediction, Sampler, build_plan, check_replacement
from tinydiff.thresholding import x0_limit

__all__ = [
    "SAMPLE_OPTIONS",
    "EditingMixin",
    "check_invertible",
    "deterministic_samplers",
    "invert",
    "prepare",
    "sdedit_start",
]


# -- SDEdit ------------------------------------------------------------------------------------
def sdedit_start(
    process: GaussianProcess,
    times: Tensor,
    x_start: Tensor,
    strength: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The times and the start of an SDEdit run (Meng et al. 2022).

    Args:
        process: the model's process.
        times: float64 (S + 1,), the S-step spacing, decreasing to 0.
        x_start: the sample to edit, (bsz, *input_shape), on the device and in the dtype to
            sample in.
        strength: s in [0, 1]; the last $k = \lfloor sS\rfloor$ steps are run.
        generator: source of z, on x_start's device.

    Returns:
        (times_tail, x_t): float64 (k + 1,) the last k + 1 times, and
        $\alpha(t)x + \sigma(t)z$ at `t = times_tail[0]` (z ~ N(0, I) drawn from
        `generator`), x_start's shape and dtype; for k = 0, (`times[-1:]`, a copy of x_start).

    Raises:
        TypeError / ValueError: a strength that is not a number in [0, 1].
    """
    strength = _validation.check_number("strength", strength, min=0.0, max=1.0)
    num_steps = times.numel() - 1
    k = math.floor(strength * num_steps)
    tail = times[num_steps - k :]
    if k == 0:
        return tail, x_start.clone()
    z = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
    alpha, sigma = (float(v) for v in process.alpha_sigma(tail[:1].to(torch.float64)))
    return tail, alpha * x_start + sigma * z


# -- inversion ---------------------------------------------------------------------------------
def deterministic_samplers() -> list[str]:
    """Registered samplers that are deterministic with their default options (those
    `invert` takes; ddim, dpmpp_2m_sde and heun are deterministic with eta = 0, eta = 0 and
    s_churn = 0 too)."""
    return [n for n in samplers.names() if not samplers.get(n)().is_stochastic]


class _Mirror(GaussianProcess):
    """The process with alpha and sigma swapped and time reversed (t' = T - t), whose
    probability-flow ODE run forward in t' is the original run backward: its points are the
    original process's, at the original times (what the denoiser needs)."""

    def __init__(self, process: GaussianProcess) -> None:
        super().__init__(process.num_timesteps)
        self.real = process

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.real.alpha_sigma(self.num_timesteps - t)
        return sigma, alpha

    def time_at_lam(self, lam: Tensor) -> Tensor:
        return self.num_timesteps - self.real.time_at_lam(-lam)

    def points(self, t: Tensor) -> Tensor:
        return self.real.points(self.num_timesteps - self._as_time(t))


class _View:
    """The denoiser during one step: carries the guidance state from call to call, records
    the first (real) x0 and eps estimates, and, for the mirrored process, swaps them."""

    def __init__(self, denoise: Any, state: Any, step: int, device: Any, mirrored: bool) -> None:
        self.denoise, self.state, self.mirrored = denoise, state, mirrored
        self.step = torch.full((), step, dtype=torch.int64, device=device)
        self.variance = denoise.variance
        self.first: Prediction | None = None

    def real(self, x: Tensor, point: Tensor) -> Prediction:
        if isinstance(self.denoise, Denoiser):
            pred, self.state = self.denoise.predict(x, Point.of(point, x), self.state, self.step)
        else:
            pred = self.denoise(x, point)
        if self.first is None:
            self.first = pred
        return pred

    @property
    def first_x0(self) -> Tensor | None:
        return None if self.first is None else self.first.x0

    def __call__(self, x: Tensor, point: Tensor) -> Prediction:
        pred = self.real(x, point)
        return Prediction(pred.eps, pred.x0, pred.var_out) if self.mirrored else pred


class _Inverter:
    """The inversion pass Psi (module docstring) for a sampler, a process and times."""

    def __init__(
        self, solver: Sampler, process: GaussianProcess, times: Tensor, denoise: Any
    ) -> None:
        self.solver, self.denoise, self.times = solver, denoise, times
        self.path = path = process.path_values(times)
        self.num_steps = n = times.numel() - 1
        self.points = process.points(times)
        # a sampler without history: each step is a map x_i -> x_{i+1}, inverted step by step
        self.one_step = not solver.init_state(torch.zeros(()))
        self.first = bool(path.sigma[n] == 0) and n >= 1  # leave t = 0 by the fixed point
        self.last = bool(path.alpha[0] == 0) and n >= 1 + self.first  # reach alpha = 0 exactly
        lo, hi = int(self.last), n - int(self.first)  # the mirrored sampler runs t_hi .. t_lo
        self.plan: dict[str, Tensor] | None = None
        self.lo, self.hi = lo, hi
        if self.one_step:
            self.plan = build_plan(solver, path)
        elif hi > lo:
            idx = torch.arange(hi, lo - 1, -1)
            mirror = _Mirror(process)
            mpath = PathValues(
                process.num_timesteps - times[idx],
                path.sigma[idx],
                path.alpha[idx],
                -path.lam[idx],
                mirror,
            )
            self.plan = build_plan(solver, mpath)

    def __call__(self, y: Tensor, callback: Callback | None = None) -> Tensor:
        n, x = self.num_steps, y
        gstate = self.denoise.init_state(x) if isinstance(self.denoise, Denoiser) else ()
        t_next = self.times.tolist()
        i = 0  # inversion step: from times[n - i] up to times[n - i - 1]

        def after(x_next: Tensor, x0_hat: Tensor | None) -> Tensor:
            if callback is None:
                return x_next
            out = callback(i, t_next[n - i - 1], x_next, x0_hat)
            return x_next if out is None else check_replacement(out, x_next, i, "inversion")

        a, s = self.path.alpha.tolist(), self.path.sigma.tolist()
        point = self.points.to(device=x.device, dtype=x.dtype)
        if self.one_step:
            assert self.plan is not None
            table = {k: c.to(device=x.device, dtype=x.dtype) for k, c in self.plan.items()}
            eps: Tensor | None = None  # the noise prediction at t = 0: 0
            for i in range(n):
                k = n - 1 - i  # the sampling step from t_k to t_{k+1}, inverted
                row = {name: c[k] for name, c in table.items()}
                # predictor: DDIM inversion with the last noise prediction
                z = a[k] / a[k + 1] * x
                if eps is not None:
                    z = z + (s[k] - a[k] * s[k + 1] / a[k + 1]) * eps
                # one fixed-point iteration z <- z + g (x - F(z)), g = (dF/dz)^-1 for a
                # constant eps: z = (a_k / a_k+1) x + (...) eps(z, t_k), eps at the new point
                # (at alpha = 0 D is constant; a single step from alpha = 0 to sigma = 0
                # returns D whatever x_T is: nothing to invert, the predictor stays)
                if a[k] > 0:
                    gain = a[k] / a[k + 1]
                else:
                    gain = s[k] / s[k + 1] if s[k + 1] > 0 else 0.0
                v = _View(self.denoise, gstate, k, x.device, mirrored=False)
                z = z + gain * (x - self.solver.step(z, (), row, v, None)[0])
                assert v.first is not None
                pred, gstate = v.first, v.state
                eps = pred.eps
                x = after(z, pred.x0)
            return x
        if self.first:  # x_{S-1} = alpha x + sigma eps(alpha x, t_{S-1}) (x at sigma = 0)
            v = _View(self.denoise, gstate, n - 1, x.device, mirrored=True)
            z = a[n - 1] / a[n] * x
            x = after(z + s[n - 1] * v.real(z, point[n - 1]).eps, v.first_x0)
            gstate, i = v.state, i + 1
        if self.plan is not None:
            table = {k: c.to(device=x.device, dtype=x.dtype) for k, c in self.plan.items()}
            state = self.solver.init_state(x)
            for j in range(self.hi - self.lo):
                v = _View(self.denoise, gstate, self.hi - 1 - j, x.device, mirrored=True)
                x, state = self.solver.step(x, state, {k: c[j] for k, c in table.items()}, v, None)
                x = after(x, v.first_x0)
                gstate, i = v.state, i + 1
        if self.last:  # exact inverse of x_1 = (sigma_1 / sigma_0) x_T + alpha_1 D(x_T, T)
            v = _View(self.denoise, gstate, 0, x.device, mirrored=True)
            d = v.real(x, point[0]).x0
            x = after(s[0] / s[1] * (x - a[1] * d), d)
        return x


def _norms(r: Tensor) -> Tensor:
    """Per-sample norms, (bsz, 1, ..., 1) to broadcast against r."""
    return r.flatten(1).norm(dim=1).view(-1, *([1] * (r.dim() - 1)))


def check_invertible(solver: Sampler) -> Sampler:
    """`solver` if it is deterministic, else a ValueError naming the deterministic ones."""
    if solver.is_stochastic:
        raise ValueError(
            f"{type(solver).__name__} with these options is stochastic and cannot be inverted "
            f"(its steps draw fresh noise); use a deterministic sampler: "
            f"{', '.join(deterministic_samplers())} (ddim with eta=0, dpmpp_2m_sde with eta=0, "
            "heun with s_churn=0)"
        )
    return solver


@torch.no_grad()
def invert(
    denoiser: Denoiser,
    process: GaussianProcess,
    sampler: str | Sampler,
    times: Tensor,
    x: Tensor,
    *,
    sampler_kwargs: Mapping[str, Any] | None = None,
    fixed_point_iters: int = 0,
    callback: Callback | None = None,
    compile: bool | CompileOptions | StepCache = False,
    progress: bool = False,
) -> Tensor:
    r"""The x at `times[0]` from which `tinydiff.sampling.sample` with the same arguments
    returns (approximately, or to any accuracy with `fixed_point_iters`) the given x.

    See the module docstring for the method (the sampler's scheme on the mirrored process,
    exact first and last steps, and the fixed-point refinement).

    Args:
        denoiser: the model as samplers see it (`model.denoiser(cond=..., ...)`).
        process: the model's process.
        sampler: a deterministic sampler: a registered name or a `Sampler` instance.
        times: float (S + 1,), the sampling times, strictly decreasing to 0 (as for
            `tinydiff.sampling.sample`).
        x: the samples at t = 0 to invert, (bsz, *input_shape).
        sampler_kwargs: options of a sampler given by name.
        fixed_point_iters: k >= 0 refinement iterations of the round trip (module
            docstring): (2k + 2) `sampler.nfe(S)` network calls in all for k > 0.
        callback: `callback(i, t_next, x_next, x0_hat) -> Tensor | None` after each
            inversion step i of the last inversion pass (i = 0 leaves t = 0; `t_next` is the
            time reached, `x0_hat` the step's first x0 estimate); a returned tensor replaces
            `x_next`.
        compile: run the refinement's sampling passes compiled (see
            `tinydiff.sampling.sample`); the inversion passes run eagerly.
        progress: show a progress bar over the passes.

    Returns:
        x at `times[0]`, x's shape and dtype.

    Raises:
        ValueError: a stochastic sampler (the message names the deterministic ones); times
            not strictly decreasing to 0; a negative `fixed_point_iters`; a callback
            returning a tensor of another shape.
        TypeError: an unknown sampler type or option; a non-int `fixed_point_iters`.
    """
    solver = check_invertible(sampling.resolve_sampler(sampler, sampler_kwargs))
    times = sampling.check_times(times)
    iters = _validation.check_int("fixed_point_iters", fixed_point_iters, min=0)
    inverter = _Inverter(solver, process, times, denoiser)
    passes = 2 * iters + 2 if iters else 1
    bar = progress_bar(total=passes, desc="inverting", leave=False) if progress else None

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    def residual(x_t: Tensor) -> Tensor:
        tick()
        return x - sampling.sample(denoiser, process, solver, times, x_t, compile=compile)

    try:
        x_t = inverter(x, callback if iters == 0 else None)
        tick()
        if iters == 0:
            return x_t
        target, best, best_err = x, x_t, None
        for j in range(iters):
            res = residual(x_t)
            err = _norms(res)
            if best_err is not None:
                keep = best_err <= err
                best, err = torch.where(keep, best, x_t), torch.minimum(best_err, err)
            best_err = err
            target = target + res
            x_t = inverter(target, callback if j == iters - 1 else None)
            tick()
        assert best_err is not None
        return torch.where(best_err < _norms(residual(x_t)), best, x_t)
    finally:
        if bar is not None:
            bar.close()


# -- the model's side: argument preparation of sample() and invert() ---------------------------
SAMPLE_OPTIONS = frozenset(
    "sampler sampler_kwargs timestep_spacing init_noise x_start strength generator device cond "
    "guidance guidance_scale guidance_rescale guidance_kwargs use_ema check_finite clip_x0 "
    "dynamic_threshold".split()
)
"""The keyword arguments of `DiffusionModel.sample` that `prepare` takes."""


def prepare(
    model: ModelLike,
    bsz: int,
    sampling_timesteps: int | None,
    *,
    sampler: str | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
    timestep_spacing: Any = None,
    init_noise: Tensor | None = None,
    x_start: Tensor | None = None,
    strength: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    cond: dict[str, Any] | None = None,
    guidance: str | Guidance | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    check_finite: bool | None = None,
    clip_x0: Any = None,
    dynamic_threshold: Any = None,
    x_name: str = "init_noise",
) -> tuple[Denoiser, Sampler, Tensor, Tensor]:
    """The (denoiser, sampler, times, x at times[0]) of a `model.sample` call (arguments
    as there), every argument checked before any network call. With `x_start` the times
    and start are SDEdit's (`sdedit_start`); `x_name` names `init_noise` in errors
    (`model.invert` passes its x there)."""
    if x_start is not None and init_noise is not None:
        raise ValueError(
            "pass either init_noise (the sample at the first time) or x_start (a sample to "
            "edit, noised to the level of strength), not both"
        )
    if (x_start is None) != (strength is None):
        raise ValueError(
            "x_start and strength go together: pass x_start=x (bsz, *input_shape) and "
            f"strength=s in [0, 1] for SDEdit, got x_start={'a tensor' if x_start is not None else None}, "
            f"strength={strength!r}"
        )
    if strength is not None:
        strength = _validation.check_number("strength", strength, min=0.0, max=1.0)
    network = model.network(use_ema)
    strategy = resolve_guidance(
        guidance, guidance_scale, guidance_rescale, guidance_kwargs, cond=cond
    )
    solver = model.make_sampler(sampler, sampler_kwargs)
    times = model.sampling_timesteps(
        sampling_timesteps,
        timestep_spacing,
        sampler=solver,
        start_given=init_noise is not None or x_start is not None,
    )
    given, name = (init_noise, x_name) if x_start is None else (x_start, "x_start")
    shape = (bsz, *model.input_shape)
    x = sampling.initial_noise(
        model.process, shape, model.nn_module, device, generator, given, check_finite, name
    )
    if cond is not None:
        cond = conditioning.check_cond(network, cond, bsz, device=x.device)
    limit = x0_limit(clip_x0, dynamic_threshold, default=model.config.x0_limit())
    denoiser = Denoiser(
        network, model.target, model.variance, cond=cond, guidance=strategy, x0_limit=limit
    )
    if strength is not None:
        times, x = sdedit_start(model.process, times, x, strength, generator)
    return denoiser, solver, times, x


class EditingMixin:
    """`invert` on a model (`tinydiff.DiffusionModel` inherits it): the inverse of
    `sample` with a deterministic sampler."""

    @_validation.in_eval_mode
    @torch.no_grad()
    def invert(
        self,
        x: Tensor,
        sampling_timesteps: int | None = None,
        *,
        sampler: str | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
        timestep_spacing: Any = None,
        cond: dict[str, Any] | None = None,
        guidance: str | Guidance | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_kwargs: dict[str, Any] | None = None,
        use_ema: bool = False,
        fixed_point_iters: int = 0,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        compile: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """x_T such that `model.sample(len(x), sampling_timesteps, init_noise=x_T)` with the
        same settings returns x (`invert`: the sampler's scheme run forward in time, exact at
        both ends; `fixed_point_iters` refines it to any accuracy).

        Args:
            x: the samples to invert, (bsz, *input_shape) (cast to the network's dtype and
                device).
            sampling_timesteps, sampler, sampler_kwargs, timestep_spacing: as for `sample`
                (`sampler=None`: the config's); the sampler must be deterministic.
            cond, guidance, guidance_scale, guidance_rescale, guidance_kwargs, use_ema: as for
                `sample`.
            fixed_point_iters: k >= 0 refinement iterations of the round trip; the inversion
                alone makes at most `sampler.nfe(S)` network calls, (2k + 2) times that for
                k > 0.
            generator: accepted for symmetry with `sample`: inverting a deterministic
                sampler draws no noise.
            callback: `callback(i, t_next, x_next, x0_hat)` after each inversion step
                (see `invert`).
            compile: run the refinement's sampling passes compiled (see `sample`).
            progress: show a progress bar.

        Returns:
            x_T, (bsz, *input_shape), in the network's dtype.

        Raises:
            ValueError / TypeError: a stochastic sampler (the message names the deterministic
                ones) or any argument `sample` would refuse, before any network call.
        """
        model: Any = self
        x = model.check_data(x)
        denoiser, solver, times, x = prepare(
            model,
            x.shape[0],
            sampling_timesteps,
            sampler=sampler,
            sampler_kwargs=sampler_kwargs,
            timestep_spacing=timestep_spacing,
            init_noise=x,
            generator=generator,
            cond=cond,
            guidance=guidance,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            guidance_kwargs=guidance_kwargs,
            use_ema=use_ema,
            x_name="x",
        )
        check_invertible(solver)
        return invert(
            denoiser,
            model.process,
            solver,
            times,
            x,
            fixed_point_iters=fixed_point_iters,
            callback=callback,
            compile=model.compiled_steps if compile else False,
            progress=progress,
        )
