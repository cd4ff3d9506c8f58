r"""`DiffusionModel`: a network plus a configured diffusion process; training loss and sampling.

The network contract: ``nn_module(x_t, t, **cond) -> out`` where ``x_t`` has shape
(bsz, *input_shape) and ``t`` is a float tensor of shape (bsz,) on the [0, T] time scale
(integer-valued during training and for integer spacings; fractional for samplers or
spacings that use fractional times). ``out`` has x_t's shape, except that variance types with
``channel_multiplier`` > 1 (``learned_range``) need that many times the channels (dim 1).
``cond`` (optional) is a dict of keyword arguments, e.g. ``{"class_labels": y}``; see
:mod:`tinydiff.conditioning` for the null-condition and guidance contracts.

EMA weights (:meth:`DiffusionModel.enable_ema`) live in a :class:`tinydiff.ema.EMA` held as a
plain attribute: they are not parameters of the model (an optimizer over
``model.parameters()`` never sees them) and not in ``model.state_dict()``; they follow
``model.to(...)`` and are saved through :meth:`DiffusionModel.ema_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from tinydiff import conditioning, losses, samplers, schedules, spacings, targets, variances
from tinydiff.config import DiffusionModelConfig
from tinydiff.ema import EMA
from tinydiff.samplers.base import Prediction, Sampler, build_plan, run_sampler
from tinydiff.samplers.ddpm import clipped_log_beta_tilde
from tinydiff.variances import VlbTerms, posterior_coefficients

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from tinydiff._compile import CompileOptions, StepCache

__all__ = ["DiffusionModel"]


def _as_config(config: DiffusionModelConfig | dict[str, Any]) -> DiffusionModelConfig:
    if isinstance(config, DiffusionModelConfig):
        return config
    if isinstance(config, dict):
        return DiffusionModelConfig(**config)
    raise TypeError(f"config must be a DiffusionModelConfig or a dict, got {type(config).__name__}")


class _Denoiser:
    """The model as seen by samplers: (x_t, t, alpha_bar_t) -> Prediction.

    Conditioning and classifier-free guidance happen here, so every sampler supports them.
    With guidance, the conditional and unconditional rows go through the network in one
    batch of 2 bsz; the variance channels (``learned_range``) are the conditional ones.
    The network output is cast to x's dtype: under autocast the network may run in bf16 or
    fp16 while the solver keeps x's precision.
    """

    def __init__(
        self,
        model: DiffusionModel,
        network: nn.Module | None = None,
        cond: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> None:
        self.model = model
        self.variance = model.variance
        self.network = model.nn_module if network is None else network
        self.cond = cond
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.cond_2x: dict[str, Any] | None = None
        if guidance_scale is not None:
            if cond is None:
                raise ValueError("guidance_scale needs a cond to guide towards; got cond=None")
            self.cond_2x = conditioning.concat_cond(
                cond, conditioning.null_cond(self.network, cond)
            )

    def __call__(self, x: Tensor, t: Tensor, alpha_bar: Tensor) -> Prediction:
        m = self.model
        bsz = x.shape[0]
        time_dtype = m._time_dtype(x)
        if self.cond_2x is None:
            out = m._network(x, t.to(time_dtype).expand(bsz), self.cond, self.network).to(x.dtype)
            model_out, var_out = m.variance.split(out)
            x0, eps = m.target.to_x0_eps(model_out, x, alpha_bar)
            return Prediction(x0, eps, var_out)
        x2 = torch.cat([x, x])
        out = m._network(x2, t.to(time_dtype).expand(2 * bsz), self.cond_2x, self.network)
        out = out.to(x.dtype)
        model_out, var_out = m.variance.split(out)
        x0_2, eps_2 = m.target.to_x0_eps(model_out, x2, alpha_bar)
        assert self.guidance_scale is not None
        x0, eps = conditioning.apply_guidance(
            x,
            alpha_bar,
            (x0_2[:bsz], eps_2[:bsz]),
            (x0_2[bsz:], eps_2[bsz:]),
            self.guidance_scale,
            self.guidance_rescale,
        )
        return Prediction(x0, eps, None if var_out is None else var_out[:bsz])


class DiffusionModel(nn.Module):
    """A denoising diffusion model around any network.

    Args:
        nn_module: the network, called as ``nn_module(x_t, t)`` (see the module docstring).
        config: a :class:`DiffusionModelConfig` or a dict of its fields.

    Attributes:
        nn_module: the wrapped network.
        config: the validated configuration.
        alphas_cumprod: float64 tensor (T + 1,), alpha_bar for t = 0..T (on the CPU).
        target, variance: the configured prediction target and variance type instances.

    Example::

        model = DiffusionModel(net, DiffusionModelConfig(input_shape=(2,)))
        loss = model.loss(x).mean()
        x0 = model.sample(bsz=64, sampling_timesteps=50)
    """

    _ema: EMA | None  # set with object.__setattr__ in __init__ (not a submodule)

    def __init__(self, nn_module: nn.Module, config: DiffusionModelConfig | dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(nn_module, nn.Module):
            raise TypeError(
                f"nn_module must be a torch.nn.Module called as nn_module(x_t, t), "
                f"got {type(nn_module).__name__}"
            )
        self.nn_module = nn_module
        self.config = _as_config(config)
        cfg = self.config
        self.num_timesteps = cfg.num_timesteps
        self.input_shape = tuple(cfg.input_shape)
        # float64 tables live outside the state dict: they follow from the config, and
        # module.to(dtype) must never round them.
        self.alphas_cumprod = cfg.alphas_cumprod()
        self.target = targets.get(cfg.target_type)(**cfg.target_kwargs)
        self.variance = variances.get(cfg.sigma_type)(**cfg.variance_kwargs)
        self._loss_fn = losses.get(cfg.loss_type)
        self._train_tables = self._training_tables()
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}
        # a plain attribute (object.__setattr__ bypasses Module's registration): the EMA
        # weights stay out of parameters() and state_dict(); _apply/train forward to it
        object.__setattr__(self, "_ema", None)
        self._compile_options: CompileOptions | None = None
        self._step_cache: StepCache | None = None
        self._opaque_call: tuple[Any, ...] = (nn_module, None, None, None)

    # -- schedule ----------------------------------------------------------------------------
    def _training_tables(self) -> dict[str, Tensor]:
        """float64 tables indexed by integer t = 0..T for the loss (row 0 unused)."""
        ab = self.alphas_cumprod
        coef_x0, coef_xt, beta, beta_tilde = posterior_coefficients(ab[1:], ab[:-1])
        # clipped_log_beta_tilde expects sampling order (t decreasing)
        log_bt = clipped_log_beta_tilde(beta.flip(0), beta_tilde.flip(0)).flip(0)
        pad = ab.new_zeros(1)
        return {
            "alpha_bar": ab,
            "snr": ab / (1 - ab),
            "coef_x0": torch.cat([pad, coef_x0]),
            "coef_xt": torch.cat([pad, coef_xt]),
            "log_beta": torch.cat([pad, beta.log()]),
            "log_beta_tilde": torch.cat([pad, log_bt]),
        }

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {k: v.to(device) for k, v in self._train_tables.items()}
            self._device_tables[device] = tables
        return tables

    def alpha_bar(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """alpha_bar at real times t in [0, T] (float64, t's shape).

        Integers return the table; between integers the log-SNR is linearly interpolated
        (alpha_bar itself on a segment whose end has infinite log-SNR).
        """
        return schedules.alpha_bar_at(self.alphas_cumprod, torch.as_tensor(t, dtype=torch.float64))

    # -- helpers -------------------------------------------------------------------------------
    def _param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        for p in [*self.nn_module.parameters(), *self.nn_module.buffers()]:
            if p.is_floating_point():
                return p.dtype, p.device
        return torch.get_default_dtype(), torch.device("cpu")

    @staticmethod
    def _time_dtype(x: Tensor) -> torch.dtype:
        # t up to T must stay exact: never hand the network half-precision times
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _check_x(self, x: Any, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{name} must have shape (bsz, *input_shape) = (bsz, "
                f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        if x.shape[0] < 1:
            raise ValueError(f"{name} must hold at least one sample, got batch size 0")
        return x

    def _network(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: dict[str, Any] | None = None,
        network: nn.Module | None = None,
    ) -> Tensor:
        net = self.nn_module if network is None else network
        out = net(x_t, t) if cond is None else net(x_t, t, **cond)
        mult = getattr(self.variance, "channel_multiplier", 1)
        expected = (x_t.shape[0], x_t.shape[1] * mult, *x_t.shape[2:])
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            extra = (
                f" (sigma_type={self.config.sigma_type!r} needs {mult}x the input channels on "
                "dim 1: the mean channels then the variance channels)"
                if mult != 1
                else ""
            )
            raise ValueError(f"nn_module returned {got}; expected shape {expected}{extra}")
        return out

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
    ) -> Tensor:
        """Unreduced training loss; ``.mean()`` is the objective.

        Draws t uniformly from 1..T and eps ~ N(0, I), forms
        x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps, and compares the network output
        with the configured target, with optional min-SNR-gamma weighting and the variance
        type's extra term (learned_range's VLB). With ``cond`` and ``config.cond_drop_prob``
        p > 0, each sample's condition is replaced by the network's null condition with
        probability p (classifier-free guidance training, Ho & Salimans 2022).

        Args:
            x: clean data, (bsz, *input_shape), floating point.
            t: optional integer times in 1..T, shape (bsz,).
            noise: optional eps, x's shape.
            cond: optional keyword arguments of the network; tensors have leading dim bsz.
            cond_drop_mask: optional bool (bsz,), True where the condition is dropped
                (overrides the random draw with ``cond_drop_prob``).
            generator: source of t, eps and the dropout draw (default: torch's global RNG);
                on x's device.

        Returns:
            (bsz, *input_shape) per-element losses.

        Raises:
            ValueError: a cond key the network does not accept; cond_drop_prob > 0 but the
                network has no null condition.
        """
        x = self._check_x(x)
        bsz, ndim = x.shape[0], x.dim()
        if cond is not None:
            cond = conditioning.check_cond(self.nn_module, cond, bsz)
        if t is None:
            t = torch.randint(
                1, self.num_timesteps + 1, (bsz,), device=x.device, generator=generator
            )
        elif t.shape != (bsz,) or t.is_floating_point() or t.is_complex():
            raise ValueError(
                f"t must be an integer tensor of shape ({bsz},), got {t.dtype} {tuple(t.shape)}"
            )
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        elif noise.shape != x.shape:
            raise ValueError(
                f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}"
            )
        tables = self._tables(x.device)
        view = (bsz,) + (1,) * (ndim - 1)

        def at(name: str) -> Tensor:
            return tables[name][t].to(x.dtype).view(view)

        ab = at("alpha_bar")
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
        if cond is not None:
            if cond_drop_mask is None and self.config.cond_drop_prob > 0:
                u = torch.rand(bsz, generator=generator, device=x.device)
                cond_drop_mask = u < self.config.cond_drop_prob
            if cond_drop_mask is not None:
                if cond_drop_mask.shape != (bsz,) or cond_drop_mask.dtype != torch.bool:
                    raise ValueError(
                        f"cond_drop_mask must be a bool tensor of shape ({bsz},), got "
                        f"{cond_drop_mask.dtype} {tuple(cond_drop_mask.shape)}"
                    )
                cond = conditioning.drop_cond(self.nn_module, cond, cond_drop_mask)
        elif cond_drop_mask is not None:
            raise ValueError("cond_drop_mask was given without a cond to drop")
        out = self._network(x_t, t.to(self._time_dtype(x)), cond)
        model_out, var_out = self.variance.split(out)
        target = self.target.target(x, noise, ab)
        loss = self._loss_fn(model_out, target, **self.config.loss_kwargs)
        if self.config.min_snr_gamma is not None:
            snr = tables["snr"][t].view(view)
            weight = losses.min_snr_weight(
                snr, self.config.min_snr_gamma, self.target.x0_error_scale(snr)
            )
            loss = loss * weight.to(x.dtype)
        if type(self.variance).extra_loss is not variances.Variance.extra_loss:
            x0_hat, _ = self.target.to_x0_eps(model_out.detach(), x_t, ab)
            extra = self.variance.extra_loss(
                VlbTerms(
                    x0=x,
                    x_t=x_t,
                    x0_hat=x0_hat,
                    var_out=var_out,
                    coef_x0=at("coef_x0"),
                    coef_xt=at("coef_xt"),
                    log_beta=at("log_beta"),
                    log_beta_tilde=at("log_beta_tilde"),
                    is_first=(t == 1).to(x.dtype).view(view),
                    num_timesteps=self.num_timesteps,
                )
            )
            if extra is not None:
                loss = loss + extra
        return loss

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """Same as :meth:`loss`, so that DistributedDataParallel wraps the objective."""
        return self.loss(x, **kwargs)

    # -- sampling ------------------------------------------------------------------------------
    def make_sampler(
        self, sampler: str | None = None, sampler_kwargs: dict[str, Any] | None = None
    ) -> Sampler:
        """Instantiate a registered sampler (default: the config's, with its options).

        Raises:
            ValueError: unknown sampler name or bad option value.
            TypeError: unknown option name.
        """
        name = self.config.sampler_type if sampler is None else samplers.REGISTRY.canonical(sampler)
        if sampler_kwargs is None:
            sampler_kwargs = self.config.sampler_kwargs if sampler is None else {}
        return samplers.get(name).check_options(sampler_kwargs)

    def sampling_timesteps(
        self,
        sampling_timesteps: int | None = None,
        timestep_spacing: str | Sequence[float] | Tensor | None = None,
        *,
        sampler: str | None = None,
    ) -> Tensor:
        """The times a sampler visits: float64 (S + 1,), decreasing to 0.

        Args:
            sampling_timesteps: S in 1..T (default T; for explicit times, their count).
            timestep_spacing: a name in :mod:`tinydiff.spacings`, or an explicit decreasing
                list of times; default: the config's ``timestep_spacing``, and when that is
                None the sampler's ``default_spacing``.
            sampler: the sampler whose default spacing applies (default: the config's).

        Raises:
            ValueError: explicit times for a different number of steps than
                ``sampling_timesteps``.
        """
        if sampling_timesteps is not None and (
            isinstance(sampling_timesteps, bool) or not isinstance(sampling_timesteps, int)
        ):
            raise TypeError(f"sampling_timesteps must be an int, got {sampling_timesteps!r}")
        spacing = self.config.timestep_spacing if timestep_spacing is None else timestep_spacing
        if spacing is None:
            name = self.config.sampler_type if sampler is None else sampler
            spacing = samplers.get(name).default_spacing
        if isinstance(spacing, str):
            num_steps = self.num_timesteps if sampling_timesteps is None else sampling_timesteps
            return spacings.make_timesteps(
                spacing, self.num_timesteps, num_steps, self.alphas_cumprod
            )
        times = spacings.make_timesteps(spacing, self.num_timesteps, None, self.alphas_cumprod)
        if sampling_timesteps is not None and sampling_timesteps != times.numel() - 1:
            raise ValueError(
                f"the explicit timestep list has {times.numel() - 1} steps but "
                f"sampling_timesteps={sampling_timesteps}; pass sampling_timesteps="
                f"{times.numel() - 1} (or None), or a spacing name"
            )
        return times

    def optimize_timesteps(self, num_steps: int, **kwargs: Any) -> Any:
        """Sampling times chosen for this model and a sampler; see
        :func:`tinydiff.timestep_search.optimize_timesteps` for the arguments."""
        from tinydiff.timestep_search import optimize_timesteps

        return optimize_timesteps(self, num_steps, **kwargs)

    def compile_sampler(
        self,
        mode: str = "default",
        *,
        compile_network: bool = False,
        backend: str | Callable[..., Any] = "inductor",
    ) -> DiffusionModel:
        """Configure compiled sampling (``sample(..., compile=True)``); drops compiled steps.

        Each sampler's step is compiled once per (sampler options, batch shape, dtype, device)
        with ``fullgraph=True`` and reused for every step and every number of steps.

        Args:
            mode: ``"default"``, ``"reduce-overhead"`` (on CUDA: each step replays one CUDA
                graph) or ``"max-autotune"``.
            compile_network: also compile the network into the step graph (it must compile
                without graph breaks); by default the network runs eagerly, as one opaque
                operator inside the compiled step.
            backend: a :func:`torch.compile` backend (``mode`` applies to inductor only).

        Returns:
            the model itself.

        Raises:
            ValueError: unknown mode.
            TypeError: compile_network not a bool, or a bad backend.
        """
        from tinydiff._compile import CompileOptions

        self._compile_options = CompileOptions(mode, compile_network, backend)
        self._step_cache = None
        return self

    def _compiled_loop(
        self, solver: Sampler, plan: dict[str, Tensor], x: Tensor
    ) -> samplers.base.StepLoop:
        from tinydiff._compile import CompileOptions, OpaqueNetwork, StepCache

        if self._compile_options is None:
            self._compile_options = CompileOptions()
        if self._step_cache is None:
            options = self._compile_options
            network = None
            if not options.compile_network:
                mult = getattr(self.variance, "channel_multiplier", 1)
                # duck-typed: called like the network, network(x, t) -> Tensor
                network = cast(nn.Module, OpaqueNetwork(self._opaque_forward, mult))
            self._step_cache = StepCache(_Denoiser(self, network), options)
        return self._step_cache.get(solver, plan, x).stepper(plan, x)

    def _opaque_forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The network call behind compiled sampling's opaque operator.

        It reads this run's network (live or EMA), ``cond`` and guidance scale from
        ``_opaque_call`` (set by :meth:`sample`), so one compiled step serves every run. Guidance
        is applied to the raw mean output, which equals guiding (x0, eps) for every target whose
        conversion is affine in the output at fixed x_t (all built-in targets).
        """
        network, cond, cond_2x, scale = self._opaque_call
        if scale is None:
            return self._network(x, t, cond, network)
        bsz = x.shape[0]
        out = self._network(torch.cat([x, x]), torch.cat([t, t]), cond_2x, network)
        mean, var = self.variance.split(out)
        guided = mean[bsz:] + scale * (mean[:bsz] - mean[bsz:])
        return guided if var is None else torch.cat([guided, var[:bsz]], dim=1)

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
    ) -> Tensor:
        """Draw samples by running a sampler from pure noise to t = 0.

        Args:
            bsz: number of samples, >= 1.
            sampling_timesteps: S, the number of steps in 1..T (default T); S < T samples on a
                respaced subsequence with the posterior recomputed for each step pair.
            sampler: a name in :mod:`tinydiff.samplers` (default: the config's sampler_type).
            sampler_kwargs: the sampler's options (default: the config's, for its sampler).
            timestep_spacing: a name or explicit times; default: the config's
                ``timestep_spacing``, or the sampler's ``default_spacing`` when that is None.
            init_noise: x_T to start from, (bsz, *input_shape).
            generator: a torch.Generator on ``device`` for the initial and per-step noise; the
                same seed gives bitwise-identical samples.
            device: where to sample (default: the network's parameters' device).
            return_trajectory: return all iterates, (S + 1, bsz, *input_shape), noise first.
            progress: show a tqdm progress bar.
            cond: keyword arguments of the network, tensors with leading dim bsz (moved to
                ``device``), e.g. ``{"class_labels": y}`` with y (bsz,).
            guidance_scale: w for classifier-free guidance: uncond + w (cond - uncond) on
                the x0 and eps estimates (:mod:`tinydiff.conditioning`); None: no guidance.
                Needs ``cond`` and a network with a null condition. Doubles the batch of
                each network call.
            guidance_rescale: phi in [0, 1] of Lin et al. 2024 (sec. 3.4); 0 disables.
            use_ema: sample with the EMA weights (:meth:`enable_ema`); the live weights
                are untouched.
            compile: run the compiled step (see :meth:`compile_sampler`): the first call per
                sampler and batch shape compiles, later calls (any number of steps) reuse it.

        Returns:
            samples (bsz, *input_shape), in the network's parameter dtype.

        Raises:
            ValueError: bad bsz or init_noise; a cond key the network does not accept;
                guidance_scale without cond; use_ema without EMA.
        """
        if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 1:
            raise ValueError(f"bsz must be a positive int, got {bsz!r}")
        network = self._select_network(use_ema)
        if guidance_scale is not None:
            if cond is None:
                raise ValueError(
                    "guidance_scale was given without cond: classifier-free guidance needs the "
                    "condition to guide towards, e.g. cond={'class_labels': labels}"
                )
            guidance_scale = float(guidance_scale)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if guidance_rescale > 0 and guidance_scale is None:
            raise ValueError("guidance_rescale needs guidance_scale")
        solver = self.make_sampler(sampler, sampler_kwargs)
        timesteps = self.sampling_timesteps(sampling_timesteps, timestep_spacing, sampler=sampler)
        dtype, param_device = self._param_dtype_device()
        device = torch.device(device) if device is not None else param_device
        shape = (bsz, *self.input_shape)
        if init_noise is None:
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        else:
            if not isinstance(init_noise, Tensor) or tuple(init_noise.shape) != shape:
                got = (
                    tuple(init_noise.shape)
                    if isinstance(init_noise, Tensor)
                    else type(init_noise).__name__
                )
                raise ValueError(
                    f"init_noise must have shape (bsz, *input_shape) = {shape}, got {got}"
                )
            x = init_noise.to(device=device, dtype=dtype)
        if cond is not None:
            cond = conditioning.check_cond(network, cond, bsz)
            cond = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        denoiser = _Denoiser(self, network, cond, guidance_scale, guidance_rescale)
        if compile:
            options = self._compile_options
            if options is not None and options.compile_network and (cond is not None or use_ema):
                raise ValueError(
                    "compile_network=True traces the live network without conditioning: "
                    "cond, guidance and use_ema need compile_network=False (the default)"
                )
            if guidance_rescale > 0:
                raise ValueError(
                    "guidance_rescale is not supported with compile=True; use compile=False"
                )
            self._opaque_call = (network, cond, denoiser.cond_2x, guidance_scale)
        plan = build_plan(solver, timesteps, schedules.alpha_bar_at(self.alphas_cumprod, timesteps))
        return run_sampler(
            solver,
            x,
            plan,
            denoiser,
            generator=generator,
            return_trajectory=return_trajectory,
            progress=progress,
            loop=self._compiled_loop(solver, plan, x) if compile else None,
        )

    # -- EMA ---------------------------------------------------------------------------------
    def enable_ema(
        self, decay: float = 0.9999, *, warmup: bool = True, update_every: int = 1
    ) -> EMA:
        """Start keeping an EMA of the network's weights (from the current weights).

        Call :meth:`update_ema` after each ``optimizer.step()``. The decay of the k-th
        update is ``min(decay, (1 + k) / (10 + k))`` with warm-up, else ``decay``; see
        :mod:`tinydiff.ema`.

        Args:
            decay: d in [0, 1].
            warmup: use the warm-up schedule.
            update_every: average on every n-th call of :meth:`update_ema`.

        Returns:
            the :class:`~tinydiff.ema.EMA` (also :attr:`ema`).
        """
        ema = EMA(self.nn_module, decay, warmup=warmup, update_every=update_every)
        object.__setattr__(self, "_ema", ema)
        ema.averaged.train(self.training)
        return ema

    @property
    def ema(self) -> EMA | None:
        """The EMA, or None if :meth:`enable_ema` was not called."""
        return self._ema

    def _require_ema(self) -> EMA:
        if self._ema is None:
            raise ValueError(
                "EMA is not enabled on this model: call model.enable_ema(decay=...) before "
                "training (then model.update_ema() after each optimizer step)"
            )
        return self._ema

    def _select_network(self, use_ema: bool) -> nn.Module:
        return self._require_ema().module if use_ema else self.nn_module

    def update_ema(self) -> bool:
        """Average the current weights into the EMA (call after ``optimizer.step()``).

        Returns:
            whether an averaging update happened (see ``update_every``).
        """
        return self._require_ema().update(self.nn_module)

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA's state (tensors only; see :meth:`tinydiff.ema.EMA.state_dict`)."""
        return self._require_ema().state_dict()

    def load_ema_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`ema_state_dict`'s output (enable EMA first, with its options)."""
        self._require_ema().load_state_dict(state)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DiffusionModel:
        # .to()/.double()/.cuda() also move the EMA copy, which is not a submodule
        super()._apply(fn, *args, **kwargs)
        if self._ema is not None:
            self._ema.averaged._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        if self._ema is not None:
            self._ema.averaged.train(mode)
        return self

    # -- likelihood ----------------------------------------------------------------------------
    def nll(
        self,
        x: Tensor,
        *,
        timesteps: int | Sequence[int] | Tensor | None = None,
        decoder: str = "discrete",
        cond: dict[str, Any] | None = None,
        use_ema: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Variational bound on -log p(x) in bits per dimension, (bsz,).

        See :func:`tinydiff.likelihood.nll_bound` for the arguments.
        """
        from tinydiff.likelihood import nll_bound

        return nll_bound(
            self,
            x,
            timesteps=timesteps,
            decoder=decoder,
            cond=cond,
            use_ema=use_ema,
            generator=generator,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"input_shape={c.input_shape}, T={c.num_timesteps}, schedule={c.noise_schedule_type}, "
            f"target={c.target_type}, sigma={c.sigma_type}, loss={c.loss_type}, sampler={c.sampler_type}"
        )

    # -- serialization and the Hub (tinydiff.hub) ----------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, repo_id: str | None = None
    ) -> Path:
        """Save to a folder: config.json, model.safetensors, ema.safetensors, README.md.

        The layout is described in :mod:`tinydiff.hub`. Built-in :mod:`tinydiff.nn` networks
        are stored with their class name and init arguments, so :meth:`from_pretrained` needs
        nothing else; a custom network's weights are stored but not its architecture. The EMA
        weights and options are saved too when :meth:`enable_ema` was called.

        Args:
            save_directory: the folder (created if needed); files are written atomically.
            repo_id: optional Hub repository id shown in the model card's usage snippet.

        Returns:
            the folder.
        """
        from tinydiff import hub

        return hub.save_pretrained(self, save_directory, repo_id=repo_id)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        nn_module: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        load_ema: bool = False,
        use_ema_weights: bool = False,
        device: torch.device | str = "cpu",
    ) -> DiffusionModel:
        """Load a model written by :meth:`save_pretrained`, from a folder or a Hub repository.

        Hub downloads go through :func:`huggingface_hub.hf_hub_download` (its cache, tokens
        and offline mode, ``HF_HUB_OFFLINE=1``). Weights are only ever read from validated
        safetensors files (never unpickled) and loaded strictly.

        Args:
            name_or_path: a local folder, or a Hub repository id ``"user/name"``.
            nn_module: the network to load the weights into; required when the model was
                saved from a custom network (only :mod:`tinydiff.nn` networks are rebuilt
                from the config); optional (overrides the stored one) otherwise.
            revision: Hub branch, tag or commit sha (default: main).
            token: Hub token (default: the logged-in one); ``False`` for none.
            cache_dir: Hub cache folder (default: huggingface_hub's).
            local_files_only: use the cache only, never the network.
            force_download: download again even if cached.
            load_ema: also load the saved EMA: the model gets an EMA (the saved options and
                state) beside the live weights, for ``sample(..., use_ema=True)`` or more
                training.
            use_ema_weights: load the saved EMA weights *as the live weights* (no EMA on the
                returned model); the usual choice for inference. Exclusive with load_ema.
            device: where to put the model.

        Returns:
            the model (in train mode, like a freshly built one).

        Raises:
            tinydiff.hub.ModelNotFoundError: no such folder / repository / revision / file,
                a private repository without a valid token, or files not cached offline.
            tinydiff.hub.SerializationError: malformed or mismatched files (a config from a
                newer tinydiff, unknown plugin components, a custom network without
                ``nn_module=``, pickled weights only, corrupt safetensors, wrong keys,
                shapes or dtypes; missing EMA weights when asked for).
        """
        from tinydiff import hub

        return hub.from_pretrained(
            name_or_path,
            nn_module=nn_module,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            load_ema=load_ema,
            use_ema_weights=use_ema_weights,
            device=device,
            model_cls=cls,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload tinydiff model",
        create_pr: bool = False,
    ) -> CommitInfo:
        """Create the Hub repository if needed and upload :meth:`save_pretrained`'s folder.

        One commit holds config.json, model.safetensors, README.md (and ema.safetensors).

        Args:
            repo_id: ``"user/name"`` (or ``"name"`` for the token's user).
            private: visibility when the repository is created (an existing one keeps its own).
            token: Hub token with write access (default: the logged-in one).
            revision: branch to commit to (created from main if missing); default main.
            commit_message: the commit message.
            create_pr: open a pull request instead of committing directly.

        Returns:
            huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with ``.oid``, the
            commit sha to pin with ``from_pretrained(..., revision=...)``.
        """
        from tinydiff import hub

        return hub.push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )
