"""`DiffusionModelConfig`: the validated, frozen, JSON-round-trippable model configuration."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tinydiff import (
    losses,
    objectives,
    samplers,
    schedules,
    spacings,
    targets,
    thresholding,
    time_sampling,
    variances,
)
from tinydiff._registry import Registry, check_kwargs
from tinydiff.process import GaussianProcess

__all__ = [
    "FRAGILE_SNR_AMPLITUDE",
    "DiffusionModelConfig",
    "config_from_saved",
    "fragile_config_reason",
    "merge_config",
    "warn_if_fragile",
]

#: pred_eps without an x0 limit is fragile where alpha(T) / sigma(T) (alpha(T) on a
#: variance-preserving table) is below this: see :func:`fragile_config_reason`
FRAGILE_SNR_AMPLITUDE = 1e-2

#: config fields whose default changed, with the default of the versions before the change:
#: (major, minor) of the first version with the new default -> {field: old default}
_CHANGED_DEFAULTS: dict[tuple[int, int], dict[str, Any]] = {
    (0, 3): {"target_type": "pred_eps", "sampler_type": "ddpm"},
}


def _registry_name(registry: Registry[Any], value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{registry.kind} must be a name (str), got {type(value).__name__}")
    return registry.canonical(value)


#: the config fields that name a registry entry, and their registries
_COMPONENT_FIELDS: dict[str, Registry[Any]] = {
    "noise_schedule_type": schedules.REGISTRY,
    "target_type": targets.REGISTRY,
    "variance_type": variances.REGISTRY,
    "loss_type": losses.REGISTRY,
    "sampler_type": samplers.REGISTRY,
    "training_objective": objectives.REGISTRY,
}


#: the x0-limit fields and their parsers (`tinydiff.thresholding`)
_X0_LIMIT_PARSERS: dict[str, Any] = {
    "clip_x0": thresholding.parse_clip_x0,
    "dynamic_threshold": thresholding.parse_dynamic_threshold,
}


class DiffusionModelConfig(BaseModel):
    """Configuration of a :class:`tinydiff.DiffusionModel`.

    Fields that name components are checked against their registries (plugins included) and
    stored under their canonical names; each component's options go in its ``*_kwargs`` dict
    and are checked against its signature when the config is built.

    Attributes:
        input_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 28, 28)``. Required by
            :class:`~tinydiff.DiffusionModel` (here or as its keyword argument).
        num_timesteps: T, the number of diffusion steps (network times lie in [0, T]).
        noise_schedule_type: name in :mod:`tinydiff.schedules` (a discrete VP table or a
            continuous path).
        schedule_kwargs: options for the schedule function.
        target_type: name in :mod:`tinydiff.targets`. Default ``pred_v`` (Salimans & Ho
            2022): its x0 estimate never divides by alpha(t), so it stays in range where the
            signal vanishes; tinydiff 0.2's default was ``pred_eps`` (configs saved by 0.2
            keep it, :func:`config_from_saved`).
        target_kwargs: options for the target class.
        variance_type: variance type, name in :mod:`tinydiff.variances`; ``sigma_type`` (its
            name in tinydiff 0.1) is accepted as an alias on input.
        variance_kwargs: options for the variance class.
        loss_type: name in :mod:`tinydiff.losses`.
        loss_kwargs: options for the loss function (e.g. ``{"delta": 0.5}`` for huber).
        min_snr_gamma: if set, min-SNR-gamma loss weighting (Hang et al. 2023).
        sampler_type: default sampler, name in :mod:`tinydiff.samplers`, or None (the
            default): the process's default sampler (`tinydiff.samplers.default_sampler`:
            ``ddpm`` on variance-preserving processes, ``unipc`` on rectified flow, EDM and
            other paths; ``sampler_name()``). tinydiff 0.2's default was ``ddpm`` on every
            process (configs saved by 0.2 write it out and keep it).
        sampler_kwargs: default options of that sampler.
        timestep_spacing: default sampling times: a name in :mod:`tinydiff.spacings`, an
            explicit tuple of times (strictly decreasing, in [0, T], ending at 0: a final 0 is
            appended when missing; e.g. from :func:`tinydiff.timestep_search.optimize_timesteps`),
            or None (the default): each sampler's own ``default_spacing``.
        zero_terminal_snr: rescale the schedule to alpha_bar_T = 0 (Lin et al. 2024).
        time_sampling: the training-time distribution, a name in :mod:`tinydiff.time_sampling`
            (``uniform_discrete``, ``uniform``, ``logit_normal``, ``log_normal``, ...); None
            (default): the schedule's own (integers 1..T for discrete VP tables,
            logit-normal for ``rectified_flow``, log-normal for ``edm``, uniform for other
            paths; :meth:`training_times`).
        time_sampling_kwargs: its options (with ``time_sampling=None``, merged into the
            default's).
        clip_x0: clamp the denoiser's x0 estimate to a range at every sampling step (Ho et
            al. 2020; diffusers' ``clip_sample``): None (default, no clipping), a number c
            for ``(-c, c)``, or ``(lo, hi)``; stored as ``(lo, hi)``. Only x0 is clipped: the
            eps estimate stays as the target computed it. See :mod:`tinydiff.thresholding`.
        dynamic_threshold: Imagen's dynamic thresholding of x0 at every sampling step
            (Saharia et al. 2022): None (default), True (percentile 0.995, max value 1), a
            pair ``(percentile, max_value)`` or a dict with those keys; stored as the pair.
            At most one of ``clip_x0`` and ``dynamic_threshold`` may be set; ``sample()``
            can override both per call.
        cond_drop_prob: probability, per training sample, of replacing its conditioning by
            the network's null condition (classifier-free guidance training, Ho & Salimans
            2022); see :mod:`tinydiff.conditioning`.
        training_objective: what ``loss()`` computes, a name in `tinydiff.objectives`:
            ``"diffusion"`` (default: the denoising loss of the target above) or
            ``"meanflow"`` (a two-time network's average velocity, for 1-2 step sampling;
            see the few-step models page). A config that leaves ``sampler_type`` out gets
            the objective's default sampler (``flow_map`` for meanflow). Not to be confused
            with `tinydiff.timestep_search.optimize_timesteps`' ``objective``.
        training_objective_kwargs: the objective's options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    input_shape: tuple[StrictInt, ...] | None = None  # strict: True is not 1
    num_timesteps: StrictInt = Field(default=1000, ge=1, le=100_000)
    noise_schedule_type: str = "cosine"
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict)
    target_type: str = "pred_v"
    target_kwargs: dict[str, Any] = Field(default_factory=dict)
    variance_type: str = Field(
        default="upper_bound", validation_alias=AliasChoices("variance_type", "sigma_type")
    )
    variance_kwargs: dict[str, Any] = Field(default_factory=dict)
    loss_type: str = "l2"
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    min_snr_gamma: float | None = Field(default=None, gt=0)
    sampler_type: str | None = None
    sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
    timestep_spacing: str | tuple[float, ...] | None = None
    zero_terminal_snr: bool = False
    cond_drop_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    time_sampling: str | None = None
    time_sampling_kwargs: dict[str, Any] = Field(default_factory=dict)
    clip_x0: tuple[float, float] | None = None
    dynamic_threshold: tuple[float, float] | None = None
    training_objective: str = "diffusion"
    training_objective_kwargs: dict[str, Any] = Field(default_factory=dict)

    def x0_limit(self) -> thresholding.X0Limit | None:
        """The configured x0 limit (:mod:`tinydiff.thresholding`), or None."""
        if self.clip_x0 is not None:
            return thresholding.ClipX0(*self.clip_x0)
        if self.dynamic_threshold is not None:
            return thresholding.DynamicThreshold(*self.dynamic_threshold)
        return None

    def sampler_name(self, process: GaussianProcess | None = None, *, warn: bool = False) -> str:
        """The sampler used when a call names none: `sampler_type`, or where it is None
        the process's default (`tinydiff.samplers.default_sampler`).

        Args:
            process: this config's process (built when not given).
            warn: give the FutureWarning of `tinydiff.samplers.default_sampler` where
                the default differs from tinydiff 0.2's ``ddpm`` (the call's meaning changed).
        """
        if self.sampler_type is not None:
            return self.sampler_type
        return samplers.default_sampler(self.process() if process is None else process, warn=warn)

    def training_times(self) -> tuple[str, dict[str, Any]]:
        """(name, options) of the training-time distribution the loss draws from."""
        if self.time_sampling is None:
            name, kwargs = schedules.default_time_sampling(self.noise_schedule_type)
            return name, {**kwargs, **self.time_sampling_kwargs}
        return self.time_sampling, dict(self.time_sampling_kwargs)

    def process(self) -> GaussianProcess:
        """The configured Gaussian process (:func:`tinydiff.schedules.build_process`)."""
        return schedules.build_process(
            self.noise_schedule_type,
            self.num_timesteps,
            self.schedule_kwargs,
            zero_terminal_snr=self.zero_terminal_snr,
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha(t)^2 at t = 0..T, float64 (T + 1,): for a discrete VP schedule its checked
        alpha_bar table, rescaled for ``zero_terminal_snr``."""
        t = torch.arange(self.num_timesteps + 1, dtype=torch.float64)
        return self.process().alpha_bar(t)

    @property
    def sigma_type(self) -> str:
        """tinydiff 0.1's name of :attr:`variance_type`."""
        return self.variance_type

    @model_validator(mode="before")
    @classmethod
    def _objective_sampler(cls, data: Any) -> Any:
        """A config without `sampler_type` samples with its objective's default sampler."""
        if not isinstance(data, dict) or "sampler_type" in data:
            return data
        name = data.get("training_objective")
        if isinstance(name, str) and name in objectives.REGISTRY:
            default = objectives.get(name).default_sampler
            if default is not None:
                return {**data, "sampler_type": default}
        return data

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if len(v) == 0 or any(d < 1 for d in v):
            raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {v}")
        return v

    @field_validator(*_COMPONENT_FIELDS)
    @classmethod
    def _component(cls, v: Any, info: ValidationInfo) -> str | None:
        if v is None and info.field_name == "sampler_type":
            return None  # the process's default sampler
        return _registry_name(_COMPONENT_FIELDS[str(info.field_name)], v)

    @field_validator("time_sampling")
    @classmethod
    def _time_sampling(cls, v: Any) -> str | None:
        return None if v is None else _registry_name(time_sampling.REGISTRY, v)

    @field_validator("clip_x0", "dynamic_threshold", mode="before")
    @classmethod
    def _x0_limit(cls, v: Any, info: ValidationInfo) -> tuple[float, float] | None:
        parse = _X0_LIMIT_PARSERS[str(info.field_name)]
        try:
            limit = parse(v)
        except TypeError as err:
            raise ValueError(str(err)) from err
        return None if limit is None else limit.as_option()

    @field_validator("timestep_spacing", mode="before")
    @classmethod
    def _spacing(cls, v: Any, info: ValidationInfo) -> str | tuple[float, ...] | None:
        if v is None:
            return None
        if isinstance(v, str):
            return _registry_name(spacings.REGISTRY, v)
        try:  # the kind of the times (no process needed); TypeError -> ValueError for pydantic
            spacings.check_spec(v)
        except TypeError as err:
            raise ValueError(
                "timestep_spacing must be a spacing name, an explicit sequence of times "
                f"(numbers), or None; got {v!r:.80} ({err})"
            ) from err
        num_timesteps = info.data.get("num_timesteps")
        if num_timesteps is None:  # num_timesteps itself failed validation
            raise ValueError("timestep_spacing needs a valid num_timesteps to check times against")
        times = spacings.explicit_times(v, num_timesteps)
        return tuple(times.tolist())

    @model_validator(mode="after")
    def _check_components(self) -> DiffusionModelConfig:
        target_cls = targets.get(self.target_type)
        try:  # TypeError -> ValueError, so that pydantic reports a ValidationError
            schedules.check_schedule_kwargs(
                self.noise_schedule_type, self.num_timesteps, self.schedule_kwargs
            )
            if not schedules.is_path(self.noise_schedule_type):  # the table sampling will use
                schedules.build_alphas_cumprod(
                    self.noise_schedule_type,
                    self.num_timesteps,
                    self.schedule_kwargs,
                    zero_terminal_snr=self.zero_terminal_snr and self.num_timesteps >= 2,
                )
            _check_sigma_data(self.target_type, self.target_kwargs)
            check_kwargs("prediction target", self.target_type, target_cls, **self.target_kwargs)
            check_kwargs(
                "variance type",
                self.variance_type,
                variances.get(self.variance_type),
                **self.variance_kwargs,
            )
            check_kwargs(
                "loss", self.loss_type, losses.get(self.loss_type), None, None, **self.loss_kwargs
            )
            if self.sampler_type is not None or self.sampler_kwargs:
                samplers.get(self.sampler_name()).check_options(self.sampler_kwargs)
            objective = objectives.build(self.training_objective, self.training_objective_kwargs)
            ts_name, ts_kwargs = self.training_times()
            check_kwargs(
                "time-sampling distribution",
                ts_name,
                time_sampling.get(ts_name),
                1,
                None,
                generator=None,
                device="cpu",
                **ts_kwargs,
            )
        except TypeError as err:
            raise ValueError(str(err)) from err
        self._check_combinations(target_cls, ts_name)
        objective.check_config(self)
        if self.clip_x0 is not None and self.dynamic_threshold is not None:
            raise ValueError(
                f"clip_x0={self.clip_x0} and dynamic_threshold={self.dynamic_threshold} were "
                "both set; choose one (dynamic thresholding already returns x0 in [-1, 1])"
            )
        if self.zero_terminal_snr and schedules.is_path(self.noise_schedule_type):
            raise ValueError(
                f"zero_terminal_snr=True rescales discrete VP tables; noise schedule "
                f"{self.noise_schedule_type!r} is a continuous path: give it alpha(1) = 0 instead"
            )
        if self.zero_terminal_snr and self.num_timesteps < 2:
            raise ValueError("zero_terminal_snr=True needs num_timesteps >= 2")
        if self.zero_terminal_snr and getattr(target_cls, "uses_derivatives", False):
            raise ValueError(
                f"target_type={self.target_type!r} cannot be used with zero_terminal_snr=True: "
                "it needs d alpha / ds, and alpha = sqrt(alpha_bar) of a table rescaled to "
                "alpha_bar_T = 0 has an infinite slope at t = T. Use target_type='pred_v' on "
                "the table, or noise_schedule_type='rectified_flow' (alpha(1) = 0 with finite "
                "slopes)."
            )
        if self.zero_terminal_snr and not getattr(target_cls, "supports_zero_snr", True):
            raise ValueError(
                f"target_type={self.target_type!r} cannot be used with zero_terminal_snr=True: "
                "at zero SNR x_T is pure noise, so predicting the noise says nothing about x_0 "
                "and the conversion to x_0 divides by zero. Use target_type='pred_v' or "
                "'pred_x_0' (Lin et al. 2024 recommend pred_v)."
            )
        return self

    def _check_combinations(self, target_cls: Any, ts_name: str) -> None:
        """Refuse combinations that cannot work, with the reason (never a NaN later)."""
        if self.zero_terminal_snr:
            return  # checked above with its own message
        if schedules.is_path(self.noise_schedule_type):
            process = self.process()  # validates the path and its options
            if not getattr(target_cls, "supports_zero_snr", True):
                lam_T = float(process.lam(float(self.num_timesteps)))
                if lam_T == float("-inf"):
                    raise ValueError(
                        f"target_type={self.target_type!r} cannot be used with noise schedule "
                        f"{self.noise_schedule_type!r}: alpha(T) = 0 there (pure noise, "
                        "log-SNR -inf), where this target's conversion to x_0 divides by "
                        "zero (pred_eps) or its network input is infinite (edm's c_noise = "
                        "ln(sigma/alpha)/4). Use target_type='pred_velocity', 'pred_v' or "
                        "'pred_x_0'."
                    )
        if ts_name != "uniform_discrete" and (
            variances.get(self.variance_type).extra_loss is not variances.Variance.extra_loss
        ):
            raise ValueError(
                f"variance_type={self.variance_type!r} adds the variational bound of the "
                "integer step t -> t - 1 to the loss, which needs integer training times: use "
                f"time_sampling='uniform_discrete' (got {ts_name!r})"
            )
        if self.min_snr_gamma is not None and (
            getattr(target_cls, "x0_error_scale", None) is targets.Target.x0_error_scale
        ):
            raise ValueError(
                f"min_snr_gamma needs the target's x0_error_scale(snr); target_type="
                f"{self.target_type!r} does not define one (its error scale depends on more "
                "than the SNR). Drop min_snr_gamma or use pred_eps / pred_x_0 / pred_v / edm."
            )


#: EDM's sigma_data enters as s_d^2 and 1 / s_d^2 next to float32 tensors: both must be finite
_SIGMA_DATA_RANGE = (1e-18, 1e18)


def _check_sigma_data(target_type: str, kwargs: dict[str, Any]) -> None:
    if target_type != "edm" or "sigma_data" not in kwargs:
        return
    sd, (lo, hi) = kwargs["sigma_data"], _SIGMA_DATA_RANGE
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not lo <= sd <= hi:
        raise ValueError(
            f"edm sigma_data (the data's standard deviation) must be a finite number in "
            f"[{lo:g}, {hi:g}], got {sd!r}: its square enters every float32 sampling step. "
            "Normalise the data (sigma_data ~ 0.5 for data in [-1, 1])"
        )


def merge_config(config: Any, overrides: dict[str, Any]) -> DiffusionModelConfig:
    """``config`` (a config, a dict of fields or None) with the keyword fields ``overrides``
    merged in, as :class:`tinydiff.DiffusionModel` takes them.

    Raises:
        TypeError: a config of another type, or an override that is not a config field.
        ValueError: an override that sets a field which ``config`` sets to another value.
    """
    if config is None:
        base: dict[str, Any] = {}
        explicit: set[str] = set()
    elif isinstance(config, DiffusionModelConfig):
        base = config.model_dump(exclude_unset=False)
        explicit = set(config.model_fields_set)
    elif isinstance(config, dict):
        base, explicit = dict(config), set(config)
    else:
        raise TypeError(
            f"config must be a DiffusionModelConfig or a dict, got {type(config).__name__}"
        )
    if overrides:
        fields = DiffusionModelConfig.model_fields
        unknown = sorted(k for k in overrides if k not in fields and k != "sigma_type")
        if unknown:
            raise TypeError(
                f"DiffusionModel() got unexpected keyword arguments {unknown}; it takes "
                f"nn_module, config and the config's fields ({', '.join(fields)})"
            )
        probe = DiffusionModelConfig(**{**base, **overrides})
        for key, value in overrides.items():
            field = "variance_type" if key == "sigma_type" else key
            in_config = field in explicit or (key == "sigma_type" and "variance_type" in explicit)
            if in_config and getattr(probe, field) != base.get(field, base.get(key)):
                raise ValueError(
                    f"{key}={value!r} was given to DiffusionModel() and the config sets "
                    f"{field}={base.get(field, base.get(key))!r}; set it in one place"
                )
        return probe
    return config if isinstance(config, DiffusionModelConfig) else DiffusionModelConfig(**base)


def _version_key(version: Any) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``"0.2.0"`` or ``"0.3.0.dev1"``; None if it
    does not start with two integers."""
    if not isinstance(version, str):
        return None
    parts = version.strip().lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def config_from_saved(fields: dict[str, Any], tinydiff_version: str | None) -> DiffusionModelConfig:
    """The config of a saved model: ``fields`` (config.json's ``model`` object) as written by
    tinydiff ``tinydiff_version``, with every field it leaves out taking the default *that*
    version had, so a file loads with the values it was saved with.

    tinydiff writes every field, so this only matters for files written or edited by hand.
    Defaults changed since 0.2: ``target_type`` (``pred_eps`` before 0.3, ``pred_v`` since)
    and ``sampler_type`` (``"ddpm"`` before 0.3, None = the process's default since).
    An unreadable version is taken as the oldest (the old defaults apply).

    Raises:
        pydantic.ValidationError: fields that do not validate.
    """
    written = _version_key(tinydiff_version)
    filled = dict(fields)
    for changed_in, old in sorted(_CHANGED_DEFAULTS.items()):
        if written is None or written < changed_in:
            for name, value in old.items():
                filled.setdefault(name, value)
    return DiffusionModelConfig.model_validate(filled)


def fragile_config_reason(config: DiffusionModelConfig) -> str | None:
    r"""Why ``config`` is known to sample badly after short training, or None.

    A ``pred_eps`` network's x0 estimate is :math:`(x_t - \sigma\hat\epsilon)/\alpha`: at the
    first sampling step it multiplies the network's eps error by :math:`\sigma(T)/\alpha(T)`.
    The config is fragile where :math:`\alpha(T)/\sigma(T)` is below
    :data:`FRAGILE_SNR_AMPLITUDE` (1e-2) and x0 is neither clipped nor thresholded: of the
    built-in tables ``cosine`` (4.9e-5), ``sigmoid`` (5.5e-4) and ``linear`` (6.4e-3), not
    ``scaled_linear`` (0.068) nor ``edm`` (1/80). On a variance-preserving table
    alpha(T)/sigma(T) is alpha(T) to within 0.3%.

    Measured (benchmarks/defaults.py: ``MLP(2)``, 1000 steps of batch 256 on eight Gaussians
    of radius 1.5, ``sample(2000, 20)``): the largest |sample| with ddim is 1.4e4 on ``cosine``,
    1.3e3 on ``sigmoid``, 93 on ``linear`` and 11 on ``scaled_linear`` (pred_v: 2 on all).
    """
    if config.target_type != "pred_eps" or config.x0_limit() is not None:
        return None
    if config.zero_terminal_snr:
        return None  # refused by the validator with its own message
    process = config.process()
    alpha, sigma = process.alpha_sigma(
        torch.tensor(float(config.num_timesteps), dtype=torch.float64)
    )
    ratio = float(alpha / sigma)
    if not ratio < FRAGILE_SNR_AMPLITUDE:
        return None
    return (
        f"target_type='pred_eps' on noise schedule {config.noise_schedule_type!r} reaches "
        f"alpha(T)/sigma(T) = {ratio:.2g} < {FRAGILE_SNR_AMPLITUDE:g}: the first sampling step's "
        f"x0 estimate multiplies the network's noise error by {1 / ratio:.2g}, and "
        "after short training samples can land orders of magnitude outside the data. Use "
        "target_type='pred_v' (the default), or keep pred_eps and limit x0 with "
        "clip_x0=(lo, hi) (e.g. (-1, 1) for data scaled to [-1, 1]) or dynamic_threshold=True."
    )


def warn_if_fragile(config: DiffusionModelConfig, stacklevel: int = 2) -> bool:
    """Warn (``UserWarning``) with :func:`fragile_config_reason` if there is one.

    Returns:
        Whether it warned.
    """
    reason = fragile_config_reason(config)
    if reason is not None:
        warnings.warn(reason, UserWarning, stacklevel=stacklevel + 1)
    return reason is not None
