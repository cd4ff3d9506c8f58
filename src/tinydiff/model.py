r"""`DiffusionModel`: a network plus a configured diffusion process; training loss and sampling.

The network contract: ``nn_module(x_t, t, **cond) -> out``, x_t (bsz, *input_shape), t a float
(bsz,) on the [0, T] scale, ``out`` x_t's shape (``channel_multiplier`` times the channels for
``learned_range``), ``cond`` optional keyword arguments (`tinydiff.conditioning`). Sampling runs
`tinydiff.sampling.sample`; likelihood, timestep search and serialization live in their own
modules. EMA weights (`enable_ema`) are kept out of ``parameters()`` and ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import tinydiff._validation as _validation
from tinydiff import (
    editing,
    likelihood,
    objectives,
    samplers,
    sampling,
    spacings,
    targets,
    timestep_search,
    variances,
)
from tinydiff._compile import CompileMixin
from tinydiff.config import DiffusionModelConfig, merge_config, warn_if_fragile
from tinydiff.denoiser import Denoiser
from tinydiff.diffusers_compat import DiffusersMixin
from tinydiff.editing import EditingMixin
from tinydiff.ema import EMAMixin
from tinydiff.guidance import Guidance
from tinydiff.guidance import resolve as resolve_guidance
from tinydiff.hub import HubMixin
from tinydiff.posterior import PosteriorMixin
from tinydiff.process import GaussianProcess
from tinydiff.samplers.base import Callback, Sampler

__all__ = ["DiffusionModel"]


class DiffusionModel(
    EMAMixin, CompileMixin, EditingMixin, PosteriorMixin, HubMixin, DiffusersMixin, nn.Module
):
    """A denoising diffusion model around any network: ``model.loss(x).mean()`` trains it,
    ``model.sample(bsz, sampling_timesteps)`` draws from it.

    Args:
        nn_module: the network, called as ``nn_module(x_t, t)`` (see the module docstring).
        config: a `DiffusionModelConfig` or a dict of its fields.
        **config_fields: config fields given directly (``input_shape=(1, 32, 32)``), merged
            into ``config``; a field set here and (to another value) in ``config`` is an error.

    Its parts are public attributes: ``nn_module``, ``config``, ``process`` (a
    `tinydiff.process.GaussianProcess`), ``target``, ``variance`` and ``objective`` (a
    `tinydiff.objectives.Objective`, which computes `loss`).
    """

    def __init__(
        self,
        nn_module: nn.Module,
        config: DiffusionModelConfig | dict[str, Any] | None = None,
        **config_fields: Any,
    ) -> None:
        super().__init__()
        if not isinstance(nn_module, nn.Module):
            raise TypeError(
                f"nn_module must be a torch.nn.Module called as nn_module(x_t, t), "
                f"got {type(nn_module).__name__}"
            )
        self.config = cfg = merge_config(config, config_fields)
        if cfg.input_shape is None:
            raise ValueError(
                "input_shape is required: the shape of one sample, e.g. input_shape=(1, 32, 32), "
                "in the config or as DiffusionModel(..., input_shape=...)"
            )
        warn_if_fragile(cfg)
        self.nn_module = nn_module
        self.input_shape: tuple[int, ...] = tuple(cfg.input_shape)
        # float64, outside the state dict: module.to(dtype) must never round the process
        self.process: GaussianProcess = cfg.process()
        self.target = targets.build(cfg.target_type, cfg.target_kwargs)
        self.variance = variances.get(cfg.variance_type)(**cfg.variance_kwargs)
        self.objective = objectives.build(cfg.training_objective, cfg.training_objective_kwargs)
        self.objective.check_network(nn_module)
        # a plain attribute (object.__setattr__ bypasses Module's registration): the EMA
        # weights stay out of parameters() and state_dict(); _apply/train forward to it
        object.__setattr__(self, "_ema", None)

    # -- the process and the network -------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """T: network times lie in [0, T]."""
        return self.config.num_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha(t)^2 at t = 0..T, float64 (T + 1,): the alpha_bar table of a discrete VP schedule."""
        return self.process.alpha_bar(torch.arange(self.num_timesteps + 1, dtype=torch.float64))

    def alpha_bar(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """alpha(t)^2 at real times t in [0, T] (float64, t's shape)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        self.process.check_times(t)
        return self.process.alpha_bar(t)

    def check_data(self, x: Any, name: str = "x") -> Tensor:
        """Return ``x`` if it is a floating-point batch (bsz >= 1, *input_shape), else raise
        TypeError (not a floating-point tensor) or ValueError (wrong shape, empty batch)."""
        return _validation.check_data(x, self.input_shape, name)

    def network(self, use_ema: bool = False) -> nn.Module:
        """The live network, or the EMA copy with ``use_ema=True``."""
        return self._require_ema().module if use_ema else self.nn_module

    def denoiser(
        self,
        *,
        cond: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        use_ema: bool = False,
        network: nn.Module | None = None,
        guidance: str | Guidance | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
    ) -> Denoiser:
        """The model as samplers see it (`tinydiff.denoiser.Denoiser`): the live or EMA
        network (or ``network``) with the run's ``cond`` and guidance (the options of
        `sample`, checked by `tinydiff.guidance.resolve`)."""
        net = self.network(use_ema) if network is None else network
        strategy = resolve_guidance(
            guidance, guidance_scale, guidance_rescale, guidance_kwargs, cond=cond
        )
        return Denoiser(net, self.target, self.variance, cond=cond, guidance=strategy)

    # -- training ------------------------------------------------------------------------------
    def loss(
        self,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        cond_drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        **objective_options: Any,
    ) -> Tensor:
        """Unreduced training loss, (bsz, *input_shape); ``.mean()`` is the objective.

        Computed by the config's ``training_objective`` (`tinydiff.objectives`); the default
        ``"diffusion"`` draws t (`tinydiff.time_sampling`) and eps ~ N(0, I), forms x_t =
        alpha(t) x + sigma(t) eps, and compares the network output with the target (min-SNR
        weighting and the VLB term where configured; ``cond_drop_prob`` drops conditions).

        Args:
            x: clean data, (bsz, *input_shape), floating point.
            t: optional times (bsz,): integers in 1..T or real times in (0, T].
            noise: optional eps, x's shape.
            cond: optional keyword arguments of the network; tensors have leading dim bsz.
            cond_drop_mask: optional bool (bsz,), True where the condition is dropped.
            generator: source of t, eps and the dropout draw, on x's device.
            check_finite: refuse NaN / inf in x and noise: True, False, or None (default:
                CPU tensors only, where the check costs no host sync).
            **objective_options: options of the objective's loss (meanflow: ``r``;
                consistency: ``r``, ``step``).

        Returns:
            (bsz, *input_shape) per-element losses. Bad input raises ValueError or TypeError
            naming the argument (a cond key, t out of range, non-finite data, a dtype).
        """
        return self.objective.loss(
            self,
            x,
            t=t,
            noise=noise,
            cond=cond,
            cond_drop_mask=cond_drop_mask,
            generator=generator,
            check_finite=check_finite,
            **objective_options,
        )

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Same as `loss`, so that DistributedDataParallel wraps the objective."""
        return self.loss(x, **kwargs)

    # -- sampling ------------------------------------------------------------------------------
    def make_sampler(
        self, sampler: str | None = None, sampler_kwargs: dict[str, Any] | None = None
    ) -> Sampler:
        """Instantiate a registered sampler (default: the config's, with its options);
        unknown names or option values raise ValueError, unknown options TypeError."""
        name = self.config.sampler_name(self.process, warn=True) if sampler is None else sampler
        sampler_kwargs = _validation.check_kwargs_dict("sampler_kwargs", sampler_kwargs)
        if sampler_kwargs is None:
            sampler_kwargs = self.config.sampler_kwargs if sampler is None else {}
        return samplers.get(name).check_options(sampler_kwargs)

    def sampling_timesteps(
        self,
        sampling_timesteps: int | None = None,
        timestep_spacing: str | Sequence[float] | Tensor | None = None,
        *,
        sampler: str | Sampler | None = None,
        start_given: bool = True,
    ) -> Tensor:
        """The times a sampler visits, float64 (S + 1,) decreasing to 0: ``timestep_spacing``
        (a name or explicit times), else the config's, else ``sampler``'s default spacing for
        the process, with S steps (default: `tinydiff.samplers.sampling_defaults`), resolved by
        `tinydiff.spacings.resolve` (raises on anything invalid; warns about explicit times
        starting below T unless ``start_given``)."""
        spec = self.config.timestep_spacing if timestep_spacing is None else timestep_spacing
        solver = sampler if isinstance(sampler, Sampler) else self.make_sampler(sampler)
        default, steps = samplers.sampling_defaults(solver, self.process, spec, sampling_timesteps)
        return spacings.resolve(spec, self.process, steps, default, start_given=start_given)

    def optimize_timesteps(self, num_steps: int, **kwargs: Any) -> Any:
        """Sampling times chosen for this model and a sampler; see
        `tinydiff.timestep_search.optimize_timesteps` for the arguments."""
        return timestep_search.optimize_timesteps(self, num_steps, **kwargs)

    @_validation.in_eval_mode
    @torch.no_grad()
    def sample(
        self,
        bsz: int = 64,
        sampling_timesteps: int | None = None,
        *,
        sampler: str | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
        timestep_spacing: str | Sequence[float] | Tensor | None = None,
        init_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        cond: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        use_ema: bool = False,
        compile: bool = False,
        check_finite: bool | None = None,
        callback: Callback | None = None,
        guidance: str | Guidance | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
        clip_x0: Any = None,
        dynamic_threshold: Any = None,
        x_start: Tensor | None = None,
        strength: float | None = None,
    ) -> Tensor:
        """Draw samples (bsz, *input_shape), in the network's dtype, by running a sampler from
        noise at t = T to t = 0. Bad arguments raise ValueError or TypeError before sampling.

        Args:
            bsz: number of samples, >= 1.
            sampling_timesteps: S, the number of steps in 1..T (default: 50, T if stochastic).
            sampler: a name in `tinydiff.samplers` (default: the config's or process's).
            sampler_kwargs: the sampler's options (default: the config's, for its sampler).
            timestep_spacing: a spacing name or explicit times (default: config's, sampler's).
            init_noise: x_T, (bsz, *input_shape) (default: N(0, prior_std^2 I)).
            generator: source of all noise, on ``device``; a seed repeats bitwise.
            device: where to sample (default: the network's device).
            return_trajectory: return all iterates, (S + 1, bsz, *input_shape), noise first.
            progress: show a progress bar.
            cond: keyword arguments of the network, tensors with leading dim bsz.
            guidance_scale: w of classifier-free guidance (or of the ``guidance`` method).
            guidance_rescale: phi in [0, 1] of Lin et al. 2024 (sec. 3.4); 0 disables.
            use_ema: sample with the EMA weights (`enable_ema`).
            compile: run the compiled step (see `compile_sampler`).
            check_finite: refuse NaN/inf samples (one host sync) unless False; see `loss`.
            callback: called after each step, may replace x (`tinydiff.sampling.sample`).
            guidance: a guidance method name (`tinydiff.guidance`) or strategy object.
            guidance_kwargs: options of the guidance method.
            clip_x0: clip x0 estimates to (lo, hi) (`tinydiff.thresholding`; default: config).
            dynamic_threshold: Imagen's (percentile, max) threshold of x0 (default: config).
            x_start: SDEdit: a sample to edit, (bsz, *input_shape) (not with init_noise).
            strength: s in [0, 1] with x_start: the last floor(s S) steps run from its noised
                version (`tinydiff.editing.sdedit_start`); 0 returns x_start.
        """
        options = {k: v for k, v in locals().items() if k in editing.SAMPLE_OPTIONS}
        denoiser, solver, times, x = editing.prepare(self, bsz, sampling_timesteps, **options)
        if times.numel() == 1:  # SDEdit with strength < 1 / S: no step, x_start itself
            return x[None] if return_trajectory else x
        out = sampling.sample(
            denoiser,
            self.process,
            solver,
            times,
            x,
            generator=generator,
            callback=callback,
            compile=self.compiled_steps if compile else False,
            return_trajectory=return_trajectory,
            progress=progress,
        )
        _validation.check_finite_samples(out, return_trajectory, check_finite)
        return out

    # -- likelihood ----------------------------------------------------------------------------
    def nll(self, x: Tensor, *, method: str | None = None, **options: Any) -> Tensor:
        """Negative log-likelihood of x in bits per dimension, (bsz,); see
        `tinydiff.likelihood.nll` for ``method`` (``"vlb"`` or ``"ode"``) and the options
        (``timesteps``, ``decoder``, ``cond``, ``use_ema``, ``generator``, ODE options)."""
        return likelihood.nll(self, x, method=method, **options)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"input_shape={c.input_shape}, T={c.num_timesteps}, schedule={c.noise_schedule_type}, "
            f"target={c.target_type}, variance={c.variance_type}, loss={c.loss_type}, "
            f"sampler={c.sampler_name(self.process)}"
        )
