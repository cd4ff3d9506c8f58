"""`DiffusionModelConfig`: the validated, frozen, JSON-round-trippable model configuration."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tinydiff import losses, samplers, schedules, spacings, targets, variances
from tinydiff._registry import Registry, check_kwargs

__all__ = ["DiffusionModelConfig"]


def _registry_name(registry: Registry[Any], value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{registry.kind} must be a name (str), got {type(value).__name__}")
    return registry.canonical(value)


class DiffusionModelConfig(BaseModel):
    """Configuration of a :class:`tinydiff.DiffusionModel`.

    Fields that name components are checked against their registries (plugins included) and
    stored under their canonical names; each component's options go in its ``*_kwargs`` dict
    and are checked against its signature when the config is built.

    Attributes:
        input_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 28, 28)``. Required.
        num_timesteps: T, the number of diffusion steps.
        noise_schedule_type: name in :mod:`tinydiff.schedules`.
        schedule_kwargs: options for the schedule function.
        target_type: name in :mod:`tinydiff.targets`.
        target_kwargs: options for the target class.
        sigma_type: variance type, name in :mod:`tinydiff.variances`.
        variance_kwargs: options for the variance class.
        loss_type: name in :mod:`tinydiff.losses`.
        loss_kwargs: options for the loss function (e.g. ``{"delta": 0.5}`` for huber).
        min_snr_gamma: if set, min-SNR-gamma loss weighting (Hang et al. 2023).
        sampler_type: default sampler, name in :mod:`tinydiff.samplers`.
        sampler_kwargs: default options of that sampler.
        timestep_spacing: default sampling times: a name in :mod:`tinydiff.spacings`, an
            explicit tuple of times (strictly decreasing, in [0, T], ending at 0: a final 0 is
            appended when missing; e.g. from :func:`tinydiff.timestep_search.optimize_timesteps`),
            or None (the default): each sampler's own ``default_spacing``.
        zero_terminal_snr: rescale the schedule to alpha_bar_T = 0 (Lin et al. 2024).
        cond_drop_prob: probability, per training sample, of replacing its conditioning by
            the network's null condition (classifier-free guidance training, Ho & Salimans
            2022); see :mod:`tinydiff.conditioning`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    input_shape: tuple[int, ...]
    num_timesteps: int = Field(default=1000, ge=1, le=100_000)
    noise_schedule_type: str = "cosine"
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict)
    target_type: str = "pred_eps"
    target_kwargs: dict[str, Any] = Field(default_factory=dict)
    sigma_type: str = "upper_bound"
    variance_kwargs: dict[str, Any] = Field(default_factory=dict)
    loss_type: str = "l2"
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    min_snr_gamma: float | None = Field(default=None, gt=0)
    sampler_type: str = "ddpm"
    sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
    timestep_spacing: str | tuple[float, ...] | None = None
    zero_terminal_snr: bool = False
    cond_drop_prob: float = Field(default=0.0, ge=0.0, le=1.0)

    def alphas_cumprod(self) -> torch.Tensor:
        """The configured schedule table: float64 (T + 1,), alpha_bar for t = 0..T, checked and
        rescaled for ``zero_terminal_snr`` (see :func:`tinydiff.schedules.build_alphas_cumprod`).
        """
        return schedules.build_alphas_cumprod(
            self.noise_schedule_type,
            self.num_timesteps,
            self.schedule_kwargs,
            zero_terminal_snr=self.zero_terminal_snr,
        )

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) == 0 or any(d < 1 for d in v):
            raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {v}")
        return v

    @field_validator("noise_schedule_type")
    @classmethod
    def _schedule(cls, v: Any) -> str:
        return _registry_name(schedules.REGISTRY, v)

    @field_validator("target_type")
    @classmethod
    def _target(cls, v: Any) -> str:
        return _registry_name(targets.REGISTRY, v)

    @field_validator("sigma_type")
    @classmethod
    def _variance(cls, v: Any) -> str:
        return _registry_name(variances.REGISTRY, v)

    @field_validator("loss_type")
    @classmethod
    def _loss(cls, v: Any) -> str:
        return _registry_name(losses.REGISTRY, v)

    @field_validator("sampler_type")
    @classmethod
    def _sampler(cls, v: Any) -> str:
        return _registry_name(samplers.REGISTRY, v)

    @field_validator("timestep_spacing", mode="before")
    @classmethod
    def _spacing(cls, v: Any, info: ValidationInfo) -> str | tuple[float, ...] | None:
        if v is None:
            return None
        if isinstance(v, str):
            return _registry_name(spacings.REGISTRY, v)
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().flatten().tolist()
        if not isinstance(v, (list, tuple)) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in v
        ):
            raise ValueError(
                "timestep_spacing must be a spacing name, an explicit sequence of times "
                f"(numbers), or None; got {v!r}"
            )
        num_timesteps = info.data.get("num_timesteps")
        if num_timesteps is None:  # num_timesteps itself failed validation
            raise ValueError("timestep_spacing needs a valid num_timesteps to check times against")
        times = spacings.make_timesteps(
            tuple(float(t) for t in v), num_timesteps, None, torch.zeros(0)
        )
        return tuple(times.tolist())

    @model_validator(mode="after")
    def _check_components(self) -> DiffusionModelConfig:
        target_cls = targets.get(self.target_type)
        try:  # TypeError -> ValueError, so that pydantic reports a ValidationError
            check_kwargs(
                "noise schedule",
                self.noise_schedule_type,
                schedules.get(self.noise_schedule_type),
                self.num_timesteps,
                **self.schedule_kwargs,
            )
            check_kwargs("prediction target", self.target_type, target_cls, **self.target_kwargs)
            check_kwargs(
                "variance type",
                self.sigma_type,
                variances.get(self.sigma_type),
                **self.variance_kwargs,
            )
            check_kwargs(
                "loss", self.loss_type, losses.get(self.loss_type), None, None, **self.loss_kwargs
            )
            samplers.get(self.sampler_type).check_options(self.sampler_kwargs)
        except TypeError as err:
            raise ValueError(str(err)) from err
        if self.zero_terminal_snr and self.num_timesteps < 2:
            raise ValueError("zero_terminal_snr=True needs num_timesteps >= 2")
        if self.zero_terminal_snr and not getattr(target_cls, "supports_zero_snr", True):
            raise ValueError(
                f"target_type={self.target_type!r} cannot be used with zero_terminal_snr=True: "
                "at zero SNR x_T is pure noise, so predicting the noise says nothing about x_0 "
                "and the conversion to x_0 divides by zero. Use target_type='pred_v' or "
                "'pred_x_0' (Lin et al. 2024 recommend pred_v)."
            )
        return self
