r"""Sampling as a function: any sampler, any denoiser, any process, from any start time.

```python
from tinydiff.sampling import sample

x0 = sample(model.denoiser(), model.process, "dpmpp_2m", times, x_T)
```

`sample` needs no `tinydiff.DiffusionModel`: a `tinydiff.denoiser.Denoiser` (a network
with its target and variance type), a `tinydiff.process.GaussianProcess`, a sampler and the
times it visits. The times may start below T (the sample x is then taken to be at
``times[0]``: SDEdit, inpainting and posterior samplers start there), and a per-step
``callback`` sees every new sample and the step's x0 estimate, and may replace the sample
(k-diffusion's callback, with the return value honoured: that is how inpainting and
posterior sampling act between steps). Data flows one way: process and times -> plan
(`tinydiff.samplers.base.build_plan`, built once) -> loop (`tinydiff.samplers.base.run_loop`),
eager or compiled.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tinydiff import _validation, samplers
from tinydiff._compile import CompileOptions, StepCache
from tinydiff.denoiser import Denoiser
from tinydiff.process import GaussianProcess
from tinydiff.samplers.base import Callback, Sampler, build_plan, run_sampler

__all__ = [
    "Callback",
    "CompileOptions",
    "check_times",
    "initial_noise",
    "resolve_sampler",
    "sample",
]

# compiled steps of functional calls, one cache per compile options; the network of a run is
# read from the cache's slot, so entries serve every denoiser with the same layout
_CACHES: weakref.WeakValueDictionary[CompileOptions, StepCache] = weakref.WeakValueDictionary()
_KEEP: dict[CompileOptions, StepCache] = {}


def _step_cache(compile: bool | CompileOptions | StepCache) -> StepCache:
    if isinstance(compile, StepCache):
        return compile
    options = compile if isinstance(compile, CompileOptions) else CompileOptions()
    cache = _CACHES.get(options)
    if cache is None:
        cache = _KEEP[options] = _CACHES[options] = StepCache(options)
    return cache


def resolve_sampler(sampler: str | Sampler, options: Mapping[str, Any] | None = None) -> Sampler:
    """A `Sampler` from a registered name and its options, or the instance itself.

    Raises:
        ValueError: options given with an instance; an unknown name or option value.
        TypeError: neither a name nor a `Sampler`; an unknown option.
    """
    if isinstance(sampler, Sampler):
        if options:
            raise ValueError("sampler_kwargs apply to a sampler name, not to a Sampler instance")
        return sampler
    if isinstance(sampler, str):
        return samplers.get(sampler).check_options(dict(options or {}))
    raise TypeError(
        f"sampler must be a registered name ({', '.join(samplers.names())}) or a "
        f"tinydiff.samplers.Sampler instance, got {type(sampler).__name__}"
    )


def initial_noise(
    process: GaussianProcess,
    shape: tuple[int, ...],
    network: nn.Module,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    init_noise: Tensor | None = None,
    check_finite: bool | None = None,
    name: str = "init_noise",
) -> Tensor:
    """x_T for a batch of ``shape`` = (bsz, *input_shape), in the network's dtype, on
    ``device`` (default: the network's): N(0, I) times ``process.prior_std()`` (1 on
    variance-preserving processes), or ``init_noise`` checked and moved there (``name``
    names it in errors, e.g. ``"x_start"``).

    Raises:
        TypeError: a generator that is not a torch.Generator.
        ValueError: a batch size that is not a positive int; a device that does not exist
            here; a batch too large for the device's memory; init_noise of another shape,
            or holding NaN or inf (checked on the CPU, or everywhere with ``check_finite``).
    """
    generator = _validation.check_generator(generator)
    dtype, param_device = _validation.dtype_device(network)
    checked = _validation.check_device(device)
    device = param_device if checked is None else checked
    if device.type == "meta":
        where = "device='meta'" if checked is not None else "the network's weights are on 'meta'"
        raise ValueError(
            f"{where}: the meta device holds no data, so nothing can be sampled there; sample on "
            "'cpu' or 'cuda' (load the weights first, e.g. with from_pretrained)"
        )
    _validation.check_bsz(shape[0], shape[1:], dtype, device)
    if init_noise is None:
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        scale = process.prior_std()
        return x if scale == 1.0 else x * scale
    if not isinstance(init_noise, Tensor) or tuple(init_noise.shape) != shape:
        got = (
            tuple(init_noise.shape) if isinstance(init_noise, Tensor) else type(init_noise).__name__
        )
        raise ValueError(f"{name} must have shape (bsz, *input_shape) = {shape}, got {got}")
    if init_noise.is_meta:
        raise ValueError(f"{name} is on the meta device (it holds no data); pass real values")
    x = init_noise.to(device=device, dtype=dtype)
    _validation.check_finite(name, x, check_finite)
    return x


def check_times(times: Tensor) -> Tensor:
    """``times`` as a float64 CPU tensor, if 1-d with at least 2 entries, strictly decreasing
    and ending at 0; else a ValueError."""
    times = torch.as_tensor(times, dtype=torch.float64).cpu()
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(
            f"times must be 1-d with at least 2 entries, got shape {tuple(times.shape)}"
        )
    if not bool((times[1:] < times[:-1]).all()) or float(times[-1]) != 0.0:
        raise ValueError(f"times must be strictly decreasing and end at 0, got {times.tolist()}")
    return times


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    process: GaussianProcess,
    sampler: str | Sampler,
    times: Tensor,
    x: Tensor,
    *,
    sampler_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    compile: bool | CompileOptions | StepCache = False,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    """Run a sampler from x at ``times[0]`` down to ``times[-1] = 0``.

    Args:
        denoiser: the model as samplers see it (e.g. ``model.denoiser(cond=..., ...)``).
        process: the Gaussian process the denoiser was trained on (``model.process``).
        sampler: a registered name (`tinydiff.samplers.names`) or a `Sampler` instance.
        times: float (S + 1,), strictly decreasing in [0, T], ending at 0 (e.g.
            ``tinydiff.spacings.make_timesteps(...)`` or ``model.sampling_timesteps(...)``).
        x: the sample at ``times[0]``, (bsz, *input_shape) (noise scaled by
            ``process.prior_std()`` when ``times[0]`` is T).
        sampler_kwargs: options of a sampler given by name.
        generator: source of the per-step noise of stochastic samplers (on x's device).
        callback: ``callback(i, t_next, x_next, x0_hat) -> Tensor | None`` after each step i:
            ``t_next`` is the time the step reached (a float), ``x_next`` the new sample,
            ``x0_hat`` the step's first denoised estimate; a returned tensor replaces
            ``x_next`` (the solver's history is left as it is), None keeps it. It runs
            eagerly, also with ``compile``. Multistep solvers (dpmpp_2m/3m, deis, unipc)
            keep the denoised estimates of earlier steps, so a replacement acts from the
            next network call on; UniPC's corrector also refines the next step from its
            stored base: for inpainting-style projections a one-step solver (ddim, euler,
            ddpm) or heun follows the replaced sample exactly.
        compile: run the compiled step: True (default options), a
            `tinydiff._compile.CompileOptions`, or a model's step cache.
        return_trajectory: return every iterate, (S + 1, bsz, *input_shape), x first.
        progress: show a progress bar.

    Returns:
        the samples at t = 0, (bsz, *input_shape), or the trajectory.

    Raises:
        ValueError: times outside [0, T], not strictly decreasing or not ending at 0; a
            callback that returns a tensor of another shape; a denoiser the sampler refuses
            (`tinydiff.samplers.Sampler.check_denoiser`).
        TypeError: an unknown sampler type or sampler option.
    """
    solver = resolve_sampler(sampler, sampler_kwargs)
    solver.check_denoiser(denoiser)
    times = check_times(times)
    plan = build_plan(solver, process.path_values(times))
    loop = None
    if compile is not False:
        loop = _step_cache(compile).loop(solver, plan, x, denoiser, with_x0=callback is not None)
    try:
        return run_sampler(
            solver,
            x,
            plan,
            denoiser,
            generator=generator,
            return_trajectory=return_trajectory,
            progress=progress,
            loop=loop,
            callback=callback,
        )
    finally:
        if loop is not None:
            loop.close()
