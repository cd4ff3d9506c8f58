r"""`DiffusionModel`: a network plus a configured diffusion process; training loss and sampling.

The network contract: ``nn_module(x_t, t, **cond) -> out`` where ``x_t`` has shape
(bsz, *input_shape) and ``t`` is a float tensor of shape (bsz,) on the [0, T] time scale
(integer-valued during training and for integer spacings; fractional for samplers or
spacings that use fractional times), for every process. ``out`` has x_t's shape, except that
variance types with ``channel_multiplier`` > 1 (``learned_range``) need that many times the
channels (dim 1). ``cond`` (optional) is a dict of keyword arguments, e.g.
``{"class_labels": y}``; see :mod:`tinydiff.conditioning`.

The model composes: the process (:mod:`tinydiff.process`, from the config's schedule), the
target, the variance type and the loss; sampling goes config -> process -> plan
(:func:`tinydiff.samplers.base.build_plan`) -> loop (:func:`~tinydiff.samplers.base.run_sampler`),
calling the network only through a :class:`tinydiff.denoiser.Denoiser`.

EMA weights (:meth:`DiffusionModel.enable_ema`) live in a :class:`tinydiff.ema.EMA` held as a
plain attribute: they are not parameters of the model (an optimizer over
``model.parameters()`` never sees them) and not in ``model.state_dict()``; they follow
``model.to(...)`` and are saved through :meth:`DiffusionModel.ema_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import tinydiff._validation as _validation
from tinydiff import conditioning, losses, samplers, spacings, targets, time_sampling, variances
from tinydiff.config import DiffusionModelConfig, merge_config
from tinydiff.denoiser import Denoiser, network_time_dtype
from tinydiff.diffusers_compat import DiffusersMixin
from tinydiff.ema import EMA, EMAMixin
from tinydiff.hub import HubMixin
from tinydiff.process import GaussianProcess, Point
from tinydiff.samplers.base import Sampler, build_plan, run_sampler
from tinydiff.variances import VlbTerms

if TYPE_CHECKING:
    from tinydiff._compile import CompileOptions, StepCache

__all__ = ["DiffusionModel"]


class DiffusionModel(EMAMixin, HubMixin, DiffusersMixin, nn.Module):
    """A denoising diffusion model around any network.

    Args:
        nn_module: the network, called as ``nn_module(x_t, t)`` (see the module docstring).
        config: a :class:`DiffusionModelConfig` or a dict of its fields.
        **config_fields: config fields given directly (``num_timesteps=500,
            input_shape=(1, 32, 32)``), merged into ``config``; setting a field both here and
            (to another value) in ``config`` is an error.

    Attributes:
        nn_module: the wrapped network.
        config: the validated configuration.
        process: the :class:`~tinydiff.process.GaussianProcess` (alpha(t), sigma(t)).
        target, variance: the configured prediction target and variance type instances.

    Example::

        model = DiffusionModel(net, DiffusionModelConfig(input_shape=(2,)))
        loss = model.loss(x).mean()
        x0 = model.sample(bsz=64, sampling_timesteps=50)
    """

    _ema: EMA | None  # set with object.__setattr__ in __init__ (not a submodule)

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
        self.nn_module = nn_module
        self.input_shape: tuple[int, ...] = tuple(cfg.input_shape)
        # float64 process tables live outside the state dict: they follow from the config, and
        # module.to(dtype) must never round them
        self.process: GaussianProcess = cfg.process()
        self.target = targets.build(cfg.target_type, cfg.target_kwargs)
        self.variance = variances.get(cfg.variance_type)(**cfg.variance_kwargs)
        self._loss_fn = losses.get(cfg.loss_type)
        self._train_tables = variances.posterior_tables(self.process)
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}
        # a plain attribute (object.__setattr__ bypasses Module's registration): the EMA
        # weights stay out of parameters() and state_dict(); _apply/train forward to it
        object.__setattr__(self, "_ema", None)
        self._compile_options: CompileOptions | None = None
        self._step_cache: StepCache | None = None

    # -- the process ----------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """T: network times lie in [0, T]."""
        return self.config.num_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha(t)^2 at t = 0..T, float64 (T + 1,): the alpha_bar table of a discrete VP schedule."""
        return self.process.alpha_bar(torch.arange(self.num_timesteps + 1, dtype=torch.float64))

    def alpha_bar(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """alpha(t)^2 at real times t in [0, T] (float64, t's shape): alpha_bar for a
        variance-preserving process (see :class:`tinydiff.process.DiscreteVP`)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        self.process.check_times(t)
        return self.process.alpha_bar(t)

    # -- helpers -------------------------------------------------------------------------------
    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {k: v.to(device) for k, v in self._train_tables.items()}
            self._device_tables[device] = tables
        return tables

    def check_data(self, x: Any, name: str = "x") -> Tensor:
        """Return ``x`` if it is a floating-point batch (bsz >= 1, *input_shape), else raise.

        Raises:
            TypeError: not a floating-point tensor.
            ValueError: wrong shape or an empty batch.
        """
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
    ) -> Denoiser:
        """The model as samplers see it (:class:`tinydiff.denoiser.Denoiser`).

        Args:
            cond: keyword arguments of the network (tensors with leading dim bsz).
            guidance_scale: classifier-free guidance scale w, or None.
            guidance_rescale: phi in [0, 1].
            use_ema: use the EMA weights.
            network: another network to call (default: the live or EMA one).
        """
        net = self.network(use_ema) if network is None else network
        return Denoiser(
            net,
            self.target,
            self.variance,
            cond=cond,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
        )

    def _param_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        for p in [*self.nn_module.parameters(), *self.nn_module.buffers()]:
            if p.is_floating_point():
                return p.dtype, p.device
        return torch.get_default_dtype(), torch.device("cpu")

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
    ) -> Tensor:
        """Unreduced training loss; ``.mean()`` is the objective.

        Draws t from the configured training-time distribution (:mod:`tinydiff.time_sampling`;
        integers uniform in 1..T for discrete VP schedules, logit-normal for rectified flow,
        log-normal in sigma for EDM) and eps ~ N(0, I), forms x_t = alpha(t) x + sigma(t) eps,
        and compares the network output with the configured target, with optional
        min-SNR-gamma weighting and the variance type's extra term (learned_range's VLB). With
        ``cond`` and ``config.cond_drop_prob`` p > 0, each sample's condition is replaced by the
        network's null condition with probability p (classifier-free guidance training, Ho &
        Salimans 2022).

        Args:
            x: clean data, (bsz, *input_shape), floating point.
            t: optional times, shape (bsz,): integers in 1..T (alpha, sigma from the
                process's integer tables) or real times in (0, T] (from the process).
            noise: optional eps, x's shape.
            cond: optional keyword arguments of the network; tensors have leading dim bsz.
            cond_drop_mask: optional bool (bsz,), True where the condition is dropped
                (overrides the random draw with ``cond_drop_prob``).
            generator: source of t, eps and the dropout draw (default: torch's global RNG);
                on x's device.
            check_finite: refuse NaN / inf in x and noise: True always, False never, None
                (default) only for CPU tensors, where the check costs no host sync.

        Returns:
            (bsz, *input_shape) per-element losses.

        Raises:
            ValueError: a cond key the network does not accept; cond_drop_prob > 0 but the
                network has no null condition; t outside 1..T; non-finite x or noise.
            TypeError: t not integer (bool and uint8 are refused), x's dtype not the
                network's, generator not a torch.Generator.
        """
        x = self.check_data(x)
        _validation.check_dtype_matches(x, self._param_dtype_device()[0])
        _validation.check_finite("x", x, check_finite)
        generator = _validation.check_generator(generator)
        bsz, ndim = x.shape[0], x.dim()
        if cond is not None:
            cond = conditioning.check_cond(self.nn_module, cond, bsz)
        if t is None:
            ts_name, ts_kwargs = self.config.training_times()
            if ts_name == "uniform_discrete" and not ts_kwargs:
                # exactly tinydiff 0.1's draw (bitwise-identical training runs)
                t = torch.randint(
                    1, self.num_timesteps + 1, (bsz,), device=x.device, generator=generator
                )
            else:
                t = time_sampling.sample_times(
                    ts_name, bsz, self.process, ts_kwargs, generator=generator, device=x.device
                )
        else:
            t = _validation.check_loss_times(t, self.num_timesteps, bsz, x.device, allow_real=True)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        elif noise.shape != x.shape:
            raise ValueError(
                f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}"
            )
        _validation.check_finite("noise", noise, check_finite)
        view = (bsz,) + (1,) * (ndim - 1)
        integer_t = not t.is_floating_point()
        if integer_t:
            tables = self._tables(x.device)

            def at(name: str) -> Tensor:
                return tables[name][t].to(x.dtype).view(view)

            alpha, sigma = at("alpha"), at("sigma")
        else:
            t64 = t.to(torch.float64)
            self.process.check_times(t64)
            a64, s64 = self.process.alpha_sigma(t64)
            alpha, sigma = a64.to(x.dtype).view(view), s64.to(x.dtype).view(view)
        zero = torch.zeros(view, dtype=x.dtype, device=x.device)
        p = Point(t.to(network_time_dtype(x)), alpha, sigma, zero, zero)
        if self.target.uses_derivatives:
            d_alpha, d_sigma = self.process.derivatives(t.to(torch.float64))
            p = p._replace(
                d_alpha=d_alpha.to(x.dtype).view(view), d_sigma=d_sigma.to(x.dtype).view(view)
            )
        x_t = p.alpha * x + p.sigma * noise
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
        model_out, var_out = self.denoiser(cond=cond).forward_network(x_t, p)
        loss = self._loss_fn(model_out, self.target.target(x, noise, p), **self.config.loss_kwargs)
        if self.config.min_snr_gamma is not None:
            snr = (
                tables["snr"][t].view(view)
                if integer_t
                else self.process.snr(t.to(torch.float64)).view(view)
            )
            weight = losses.min_snr_weight(
                snr, self.config.min_snr_gamma, self.target.x0_error_scale(snr)
            )
            loss = loss * weight.to(x.dtype)
        if type(self.variance).extra_loss is not variances.Variance.extra_loss:
            if not integer_t:
                raise ValueError(
                    "this variance type's VLB term needs integer training times t in 1..T"
                )
            x0_hat, _ = self.target.to_x0_eps(model_out.detach(), x_t, p)
            terms = VlbTerms(
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
            extra = self.variance.extra_loss(terms)
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
            return spacings.make_timesteps(spacing, self.num_timesteps, num_steps, self.process)
        times = spacings.make_timesteps(spacing, self.num_timesteps, None, self.process)
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

        Each sampler's step is compiled once per (sampler options, batch shape, dtype, device,
        guidance) with ``fullgraph=True`` and reused for every step and every number of steps.

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
            init_noise: x_T to start from, (bsz, *input_shape) (default: N(0, I) times
                ``process.prior_std()``, which is 1 for variance-preserving processes).
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
            check_finite: refuse non-finite results: the samples are checked once after the
                loop (one host sync) and init_noise on the CPU, unless False; True also
                checks init_noise on an accelerator.

        Returns:
            samples (bsz, *input_shape), in the network's parameter dtype.

        Raises:
            ValueError: bad bsz or init_noise; a cond key the network does not accept;
                guidance_scale without cond; use_ema without EMA; a device that does not
                exist here; NaN or inf in init_noise or in the samples.
            TypeError: generator, sampler_kwargs or an explicit timestep_spacing of the
                wrong type.
        """
        generator = _validation.check_generator(generator)
        sampler_kwargs = _validation.check_kwargs_dict("sampler_kwargs", sampler_kwargs)
        _validation.check_spacing(timestep_spacing)
        device = _validation.check_device(device)
        if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 1:
            raise ValueError(f"bsz must be a positive int, got {bsz!r}")
        network = self.network(use_ema)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if guidance_rescale > 0 and guidance_scale is None:
            raise ValueError("guidance_rescale needs guidance_scale")
        solver = self.make_sampler(sampler, sampler_kwargs)
        timesteps = self.sampling_timesteps(sampling_timesteps, timestep_spacing, sampler=sampler)
        dtype, param_device = self._param_dtype_device()
        device = torch.device(device) if device is not None else param_device
        shape = (bsz, *self.input_shape)
        _validation.check_bsz(bsz, self.input_shape, dtype, device)
        if init_noise is None:
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            scale = self.process.prior_std()
            if scale != 1.0:
                x = x * scale
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
            _validation.check_finite("init_noise", x, check_finite)
        if cond is not None:
            cond = conditioning.check_cond(network, cond, bsz)
            cond = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        denoiser = self.denoiser(
            cond=cond,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            network=network,
        )
        plan = build_plan(solver, self.process.path_values(timesteps))
        loop = None
        if compile:
            from tinydiff._compile import CompileOptions, StepCache

            if self._step_cache is None:
                self._step_cache = StepCache(self._compile_options or CompileOptions())
            loop = self._step_cache.loop(solver, plan, x, denoiser, live_network=self.nn_module)
        out = run_sampler(
            solver,
            x,
            plan,
            denoiser,
            generator=generator,
            return_trajectory=return_trajectory,
            progress=progress,
            loop=loop,
        )
        _validation.check_finite_samples(out, return_trajectory, check_finite)
        return out

    # -- likelihood ----------------------------------------------------------------------------
    def nll(
        self,
        x: Tensor,
        *,
        method: str | None = None,
        timesteps: int | Sequence[int] | Tensor | None = None,
        decoder: str = "discrete",
        cond: dict[str, Any] | None = None,
        use_ema: bool = False,
        generator: torch.Generator | None = None,
        **ode_options: Any,
    ) -> Tensor:
        """Negative log-likelihood of x in bits per dimension, (bsz,).

        Args:
            x: data, (bsz, *input_shape).
            method: ``"vlb"``, the variational bound (:func:`tinydiff.likelihood.nll_bound`;
                ``timesteps`` and ``decoder`` apply), or ``"ode"``, the probability-flow ODE
                likelihood (:func:`tinydiff.likelihood.ode_nll`; ``ode_options`` such as
                ``num_steps`` and ``divergence`` apply). Default: ``"vlb"`` for a discrete
                VP schedule, ``"ode"`` for a continuous path.
            timesteps: ``method="vlb"`` only, see :func:`~tinydiff.likelihood.nll_bound`.
            decoder: ``method="vlb"`` only, ``"discrete"`` or ``"continuous"``.
            cond: keyword arguments of the network.
            use_ema: use the EMA weights.
            generator: source of the random draws (VLB noise, Hutchinson probes).
            **ode_options: options of :func:`~tinydiff.likelihood.ode_nll`.

        Raises:
            ValueError: unknown method; ``"vlb"`` on a process where the bound does not
                apply (sigma(0) > 0 or a prior other than N(0, I), e.g. ``edm``).
        """
        from tinydiff import likelihood
        from tinydiff.process import DiscreteVP

        if method is None:
            method = "vlb" if isinstance(self.process, DiscreteVP) else "ode"
        if method == "ode":
            return likelihood.ode_nll(
                self, x, cond=cond, use_ema=use_ema, generator=generator, **ode_options
            )
        if method != "vlb":
            raise ValueError(f"nll method must be 'vlb' or 'ode', got {method!r}")
        if ode_options:
            raise TypeError(f"options {sorted(ode_options)} apply to method='ode' only")
        reason = likelihood.vlb_applies(self)
        if reason is not None:
            raise ValueError(
                f"method='vlb' does not apply to this model: {reason}. Use method='ode' (the "
                "probability-flow ODE likelihood, valid on every process)."
            )
        return likelihood.nll_bound(
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
            f"target={c.target_type}, variance={c.variance_type}, loss={c.loss_type}, "
            f"sampler={c.sampler_type}"
        )
