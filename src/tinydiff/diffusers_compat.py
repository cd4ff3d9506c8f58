r"""Bring a diffusers model: read diffusers UNet checkpoints and scheduler configs, write them back.

:class:`DiffusersMixin` gives :class:`tinydiff.DiffusionModel` the classmethod
:meth:`~DiffusersMixin.from_diffusers` and the method :meth:`~DiffusersMixin.to_diffusers`.
diffusers is an optional dependency (``pip install "tinydiff[diffusers]"``), imported only
when one of them is called.

Time convention. diffusers numbers the training steps k = 0..T-1 and its ``alphas_cumprod[k]``
is tinydiff's :math:`\bar\alpha_t` at t = k + 1 (tinydiff's table has T + 1 entries with
:math:`\bar\alpha_0 = 1`). :class:`DiffusersUNet` therefore calls the UNet at k = t - 1, so a
tinydiff sampler that visits t evaluates exactly the network a diffusers scheduler evaluates
at k; fractional t (some spacings) give fractional k, which the UNet's sinusoidal embedding
accepts.

Betas. diffusers builds its betas and ``alphas_cumprod`` in float32; tinydiff evaluates the
same formulas in float64 (``linear``/``scaled_linear`` with ``rescale=False``,
``squaredcos_cap_v2`` as ``cosine``, ``trained_betas`` as the ``betas`` schedule). The tables
then agree to float32 rounding (about 1e-6 relative at T = 1000), and samples agree with
diffusers' own loops to about 1e-6 relative; see docs/diffusers.md for the measurements.

The translation of scheduler options is the table :data:`SCHEDULERS` (one entry per scheduler
class: the tinydiff sampler and a function for its own options) plus the options shared by
all discrete schedulers, handled in :func:`translate_scheduler_config`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

if TYPE_CHECKING:
    from tinydiff.denoiser import ModelLike

__all__ = [
    "SCHEDULERS",
    "DiffusersMixin",
    "DiffusersUNet",
    "SchedulerTranslation",
    "UnsupportedSchedulerError",
    "translate_scheduler_config",
]

_INSTALL_HINT = 'install it with `pip install "tinydiff[diffusers]"` (or `pip install diffusers`)'


class UnsupportedSchedulerError(ValueError):
    """A diffusers scheduler (or one of its options) that tinydiff cannot represent."""


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"this needs the optional dependency diffusers; {_INSTALL_HINT}") from err
    return diffusers


# -- the network ----------------------------------------------------------------------------


class DiffusersUNet(nn.Module):
    """A diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``, ...) as a tinydiff network.

    ``forward(x_t, t, **cond)`` returns the UNet's output tensor (the output object is
    unwrapped) for tinydiff times t on the [0, T] scale, calling the UNet at diffusers'
    timestep k = t - 1. ``cond`` is passed to the UNet as keyword arguments (e.g.
    ``class_labels``, ``encoder_hidden_states``).

    Args:
        unet: the diffusers model.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """x: (bsz, C, H, W); t: (bsz,) float on [0, T]. Returns the UNet output (bsz, C', H, W)."""
        out = self.unet(x, t - 1, return_dict=False, **cond)
        return out[0] if isinstance(out, (tuple, list)) else out


# -- scheduler config translation -------------------------------------------------------------

_PREDICTION = {"epsilon": "pred_eps", "sample": "pred_x_0", "v_prediction": "pred_v"}
_VARIANCE = {
    "fixed_small": "lower_bound",
    "fixed_small_log": "lower_bound",
    "fixed_large": "upper_bound",
    "fixed_large_log": "upper_bound",
    "learned_range": "learned_range",
}
_SPACING = {"trailing": "trailing", "leading": "leading", "linspace": "linspace"}

#: options that never change the model (bookkeeping, or only read when another option is on)
_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_use_default_values",
    "clip_sample_range",  # only with clip_sample
    "dynamic_thresholding_ratio",  # only with thresholding
    "sample_max_value",  # only with thresholding
    "variance_type",  # handled in translate_scheduler_config
}

#: options tinydiff does not model, with the value that is equivalent to tinydiff's behaviour;
#: another value is reported in a warning
_NEUTRAL: dict[str, Any] = {
    "clip_sample": False,
    "thresholding": False,
    "set_alpha_to_one": True,
    "final_sigmas_type": "zero",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "flow_shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "euler_at_final": False,
    "lambda_min_clipped": -math.inf,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
    "predict_x0": True,
    "disable_corrector": [],
    "solver_p": None,
    "steps_offset": 0,
    "variance_clip": None,
}


@dataclass
class SchedulerTranslation:
    """The result of :func:`translate_scheduler_config`.

    Attributes:
        config: keyword fields of :class:`tinydiff.DiffusionModelConfig` (without
            ``input_shape``), using ``variance_type`` for the variance type.
        ignored: ``{option: value}`` of the diffusers options that tinydiff does not model
            (``_class_name`` for a scheduler without a tinydiff sampler; reported in a warning by :meth:`DiffusersMixin.from_diffusers`).
    """

    config: dict[str, Any]
    ignored: dict[str, Any] = field(default_factory=dict)


#: ``options -> (config fields, consumed option names)``: the fields (``sampler_type``,
#: ``sampler_kwargs``, or any other) replace those of the shared translation
SchedulerRule = Callable[[Mapping[str, Any]], tuple[dict[str, Any], set[str]]]


def _fixed(name: str) -> SchedulerRule:
    return lambda options: ({"sampler_type": name}, set())


def _dpm_solver(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    algorithm = options.get("algorithm_type", "dpmsolver++")
    order = options.get("solver_order", 2)
    solver_type = options.get("solver_type", "midpoint")
    names = {
        ("dpmsolver++", 2): "dpmpp_2m",
        ("dpmsolver++", 3): "dpmpp_3m",
        ("dpmsolver++", 1): "ddim",
    }
    names[("sde-dpmsolver++", 2)] = "dpmpp_2m_sde"
    name = names.get((algorithm, order))
    if name is None:
        raise UnsupportedSchedulerError(
            f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r} and "
            f"solver_order={order} has no tinydiff sampler; supported: "
            f"{sorted(names)} (algorithm_type, solver_order). Pick another sampler with "
            "from_diffusers(..., sampler='dpmpp_2m') or sample(..., sampler=...)."
        )
    consumed = {"algorithm_type", "solver_order", "lower_order_final"}
    if order != 2 or solver_type == "midpoint":  # tinydiff's 2M is the midpoint form
        consumed.add("solver_type")
    return {"sampler_type": name}, consumed


def _unipc(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    kwargs: dict[str, Any] = {
        "order": int(options.get("solver_order", 2)),
        "variant": options.get("solver_type", "bh2"),
        "lower_order_final": bool(options.get("lower_order_final", True)),
        "rho": 0.5,  # diffusers fixes the single UniPC coefficient at its small-h limit 1/2
    }
    fields = {"sampler_type": "unipc", "sampler_kwargs": kwargs}
    return fields, {"solver_order", "solver_type", "lower_order_final"}


def _not_yet(message: str) -> SchedulerRule:
    def rule(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        raise UnsupportedSchedulerError(message)

    return rule


#: scheduler class name -> rule giving the tinydiff sampler and its options. Add an entry to
#: support another scheduler; a flow-matching rule will return the rectified-flow schedule
#: fields (built from ``shift``) and consume ``shift``, replacing the discrete-VP ones.
SCHEDULERS: dict[str, SchedulerRule] = {
    "DDPMScheduler": _fixed("ddpm"),
    "DDIMScheduler": _fixed("ddim"),
    "EulerDiscreteScheduler": _fixed("euler"),
    "HeunDiscreteScheduler": _fixed("heun"),
    "DPMSolverMultistepScheduler": _dpm_solver,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _fixed("deis"),
    "FlowMatchEulerDiscreteScheduler": _not_yet(
        "FlowMatchEulerDiscreteScheduler (rectified flow, with its `shift`) is not supported "
        "yet: tinydiff has no flow-matching schedule, so this checkpoint cannot be translated. "
        "Use diffusers' own pipeline for it until tinydiff adds rectified flow"
    ),
}


def _schedule(options: Mapping[str, Any], num_timesteps: int) -> tuple[str, dict[str, Any]]:
    trained = options.get("trained_betas")
    if trained is not None:
        return "betas", {"betas": [float(b) for b in trained]}
    kind = options.get("beta_schedule", "linear")
    start = float(options.get("beta_start", 1e-4))
    end = float(options.get("beta_end", 0.02))
    if kind == "linear":
        return "linear", {"beta_start": start, "beta_end": end, "rescale": False}
    if kind == "scaled_linear":
        return "scaled_linear", {"beta_start": start, "beta_end": end, "rescale": False}
    if kind == "squaredcos_cap_v2":
        return "cosine", {}  # Nichol & Dhariwal's s = 0.008, betas capped at 0.999: the same
    raise UnsupportedSchedulerError(
        f"beta_schedule={kind!r} has no tinydiff equivalent; supported: 'linear', "
        "'scaled_linear', 'squaredcos_cap_v2', or explicit trained_betas"
    )


def translate_scheduler_config(options: Mapping[str, Any]) -> SchedulerTranslation:
    """Translate a diffusers scheduler config (``scheduler_config.json``) into tinydiff config fields.

    Args:
        options: the config dict; ``_class_name`` picks the sampler (default: DDPMScheduler).

    Returns:
        the fields and the options tinydiff does not model.

    Raises:
        UnsupportedSchedulerError: an unsupported beta schedule, prediction type or variance
            type, or a flow-matching scheduler (not yet supported).
    """
    class_name = options.get("_class_name", "DDPMScheduler")
    rule = SCHEDULERS.get(class_name)
    ignored: dict[str, Any] = {}
    if rule is None:  # the schedule is still translated; the sampler stays tinydiff's default
        own: dict[str, Any] = {}
        consumed: set[str] = set()
        ignored["_class_name"] = class_name
    else:
        own, consumed = rule(options)
    num_timesteps = int(options.get("num_train_timesteps", 1000))
    schedule, schedule_kwargs = _schedule(options, num_timesteps)
    prediction = options.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise UnsupportedSchedulerError(
            f"prediction_type={prediction!r} is not supported; expected one of {sorted(_PREDICTION)}"
        )
    config: dict[str, Any] = {
        "num_timesteps": num_timesteps,
        "noise_schedule_type": schedule,
        "schedule_kwargs": schedule_kwargs,
        "target_type": _PREDICTION[prediction],
        "zero_terminal_snr": bool(options.get("rescale_betas_zero_snr", False)),
    }
    variance = options.get("variance_type")
    if variance is not None:
        if variance not in _VARIANCE:
            raise UnsupportedSchedulerError(
                f"variance_type={variance!r} is not supported; expected one of "
                f"{sorted(_VARIANCE)} (or none)"
            )
        config["variance_type"] = _VARIANCE[variance]
    elif class_name == "DDPMScheduler":
        config["variance_type"] = "lower_bound"  # DDPMScheduler's default, fixed_small
    consumed |= {
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
        "timestep_spacing",
    }
    spacing = options.get("timestep_spacing", "leading")
    offset = options.get("steps_offset", 0)
    if options.get("use_karras_sigmas", False):
        config["timestep_spacing"] = "karras"
    elif spacing in _SPACING and (spacing != "leading" or offset == 0):
        config["timestep_spacing"] = _SPACING[spacing]
        consumed.add("steps_offset")
    else:
        ignored["timestep_spacing"] = spacing
    consumed.add("use_karras_sigmas")
    config.update(own)
    for key, value in options.items():
        if key in consumed or key in _IGNORED:
            continue
        if key not in _NEUTRAL or value != _NEUTRAL[key]:
            ignored[key] = value  # unknown to tinydiff, or a value tinydiff does not model
    return SchedulerTranslation(config, ignored)


def scheduler_config_from_tinydiff(model: ModelLike) -> dict[str, Any]:
    """The DDPMScheduler options equivalent to ``model``'s diffusion process.

    Named schedules are written by name when diffusers has them (``linear``/``scaled_linear``
    with ``rescale=False`` or T = 1000, ``cosine`` with its defaults); any other schedule is
    written as ``trained_betas`` (exact up to diffusers' float32).
    """
    cfg = model.config
    reverse_target = {v: k for k, v in _PREDICTION.items()}
    if cfg.target_type not in reverse_target:
        raise UnsupportedSchedulerError(
            f"target_type={cfg.target_type!r} has no diffusers prediction_type; expected one of "
            f"{sorted(reverse_target)}"
        )
    reverse_variance = {"lower_bound": "fixed_small", "upper_bound": "fixed_large"}
    reverse_variance["learned_range"] = "learned_range"
    if cfg.variance_type not in reverse_variance:
        raise UnsupportedSchedulerError(
            f"variance_type={cfg.variance_type!r} has no diffusers variance_type; expected one of "
            f"{sorted(reverse_variance)}"
        )
    out: dict[str, Any] = {
        "num_train_timesteps": cfg.num_timesteps,
        "prediction_type": reverse_target[cfg.target_type],
        "variance_type": reverse_variance[cfg.variance_type],
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "clip_sample": False,
        "timestep_spacing": cfg.timestep_spacing
        if cfg.timestep_spacing in _SPACING
        else "trailing",
    }
    kwargs = dict(cfg.schedule_kwargs)
    plain = not kwargs.pop("rescale", True) or cfg.num_timesteps == 1000
    if cfg.noise_schedule_type in ("linear", "scaled_linear") and plain:
        defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
        start, end = defaults[cfg.noise_schedule_type]
        out.update(
            beta_schedule=cfg.noise_schedule_type,
            beta_start=float(kwargs.get("beta_start", start)),
            beta_end=float(kwargs.get("beta_end", end)),
        )
    elif cfg.noise_schedule_type == "cosine" and not kwargs:
        out["beta_schedule"] = "squaredcos_cap_v2"
    else:
        ab = model.alphas_cumprod
        if cfg.zero_terminal_snr:
            raise UnsupportedSchedulerError(
                "a zero-terminal-SNR model can only be written with a linear, scaled_linear or "
                "cosine schedule (diffusers rescales its betas itself)"
            )
        out["trained_betas"] = (1 - ab[1:] / ab[:-1]).tolist()
    return out


# -- folders ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve(
    path_or_repo: str | os.PathLike[str],
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
) -> Path:
    root = Path(path_or_repo)
    if not root.exists():
        if os.path.isabs(str(path_or_repo)) or str(path_or_repo).startswith("."):
            raise FileNotFoundError(
                f"no diffusers folder at {str(path_or_repo)!r}; pass a pipeline folder (with "
                "model_index.json), a UNet folder (with config.json), or a Hub repository id"
            )
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder}/" if subfolder else ""
        root = Path(
            snapshot_download(
                str(path_or_repo),
                revision=revision,
                token=token,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=local_files_only,
                allow_patterns=[
                    f"{prefix}*.json",
                    f"{prefix}*/*.json",
                    f"{prefix}*.safetensors",
                    f"{prefix}*/*.safetensors",
                ],
            )
        )
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (subfolder={subfolder!r})")
    return folder


def _find_parts(
    folder: Path, scheduler_config: str | os.PathLike[str] | Mapping[str, Any] | None
) -> tuple[Path, dict[str, Any]]:
    """(UNet folder, scheduler options) of a pipeline or bare UNet folder."""
    index = folder / "model_index.json"
    if index.is_file():
        components = _read_json(index)
        unet_name = next(
            (k for k in ("unet", "transformer") if isinstance(components.get(k), list)), None
        )
        if unet_name is None:
            raise ValueError(
                f"{index} names no 'unet' component (found {sorted(components)}); tinydiff "
                "reads pipelines whose denoiser is a diffusers UNet"
            )
        unet_dir = folder / unet_name
        if scheduler_config is None:
            scheduler_config = folder / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = folder
        if scheduler_config is None:
            scheduler_config = folder / "scheduler_config.json"
            if not scheduler_config.is_file():
                raise FileNotFoundError(
                    f"{folder} is neither a pipeline folder (no model_index.json) nor a UNet "
                    "folder with a scheduler_config.json beside its config.json; pass the "
                    "scheduler with scheduler_config=path_or_dict"
                )
    if isinstance(scheduler_config, Mapping):
        options = dict(scheduler_config)
    else:
        path = Path(scheduler_config)
        if path.is_dir():
            path = path / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no scheduler config at {path}")
        options = _read_json(path)
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"no UNet config.json in {unet_dir}")
    return unet_dir, options


def _load_unet(unet_dir: Path, torch_dtype: torch.dtype | None) -> nn.Module:
    diffusers = _import_diffusers()
    unet_config = _read_json(unet_dir / "config.json")
    class_name = unet_config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(
            f"{unet_dir / 'config.json'} names _class_name={class_name!r}, which is not a "
            "diffusers model class (expected e.g. 'UNet2DModel')"
        )
    if not any(unet_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"no .safetensors weights in {unet_dir}: tinydiff only reads safetensors (never "
            "pickled .bin files). Convert them once with diffusers: "
            "Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    unet: nn.Module = cls.from_pretrained(str(unet_dir), **kwargs)
    return unet


def _input_shape(unet: nn.Module) -> tuple[int, ...]:
    cfg = getattr(unet, "config", None)
    channels = getattr(cfg, "in_channels", None)
    size = getattr(cfg, "sample_size", None)
    if not isinstance(channels, int) or size is None:
        raise ValueError(
            "cannot infer input_shape from the UNet config (needs in_channels and "
            "sample_size); pass input_shape=(C, H, W)"
        )
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, int(h), int(w))


class DiffusersMixin:
    """Adds :meth:`from_diffusers` and :meth:`to_diffusers` to :class:`tinydiff.DiffusionModel`."""

    @classmethod
    def from_diffusers(
        cls,
        path_or_repo: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        scheduler_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        torch_dtype: torch.dtype | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        device: torch.device | str = "cpu",
    ) -> Self:
        """Load a diffusers UNet and its scheduler config as a :class:`DiffusionModel`.

        The network is a :class:`DiffusersUNet` (output unwrapped, time t -> k = t - 1); the
        config is :func:`translate_scheduler_config`'s translation of the scheduler config,
        and scheduler options tinydiff does not model are named in one warning.

        Args:
            path_or_repo: a pipeline folder (model_index.json, scheduler/, unet/), a UNet
                folder (config.json and safetensors weights; the scheduler config beside it
                as scheduler_config.json, or given with ``scheduler_config``), or a Hub
                repository id of either.
            subfolder: a folder inside ``path_or_repo`` holding the above.
            revision: Hub branch, tag or commit.
            scheduler_config: a scheduler config to use instead of the folder's: a dict, a
                scheduler_config.json file, or its folder.
            input_shape: (C, H, W); default from the UNet's in_channels and sample_size.
            config_overrides: fields of :class:`DiffusionModelConfig` that replace the
                translated ones (e.g. ``{"sampler_type": "dpmpp_2m"}``).
            torch_dtype: dtype to load the UNet in (default: as stored).
            token, cache_dir, local_files_only: as for :func:`huggingface_hub.snapshot_download`.
            device: where to put the model.

        Returns:
            the model.

        Raises:
            UnsupportedSchedulerError: a scheduler or option tinydiff cannot represent
                (flow-matching schedulers are not supported yet).
            FileNotFoundError: no such folder, no scheduler config, or no safetensors weights.
            ImportError: diffusers is not installed.
        """
        from tinydiff.config import DiffusionModelConfig

        folder = _resolve(path_or_repo, subfolder, revision, token, cache_dir, local_files_only)
        unet_dir, options = _find_parts(folder, scheduler_config)
        translation = translate_scheduler_config(options)  # before loading weights: fail fast
        unet = _load_unet(unet_dir, torch_dtype)
        fields = dict(translation.config)
        fields["input_shape"] = tuple(input_shape) if input_shape else _input_shape(unet)
        if config_overrides:
            fields.update(config_overrides)
        if translation.ignored:
            listed = ", ".join(f"{k}={v!r}" for k, v in sorted(translation.ignored.items()))
            warnings.warn(
                f"diffusers scheduler options not modelled by tinydiff, ignored: {listed}. "
                "tinydiff never clips or thresholds x0 and always samples down to t = 0 with "
                "alpha_bar = 1; samples can differ from diffusers' where these options matter "
                "(see docs/diffusers.md for the mapping table)",
                UserWarning,
                stacklevel=2,
            )
        try:
            config = DiffusionModelConfig(**fields)
        except ValueError as err:
            raise UnsupportedSchedulerError(
                f"the translated scheduler config is not a valid tinydiff config: {err}"
            ) from err
        model = cls(DiffusersUNet(unet), config)  # type: ignore[call-arg]
        return model.to(device)  # type: ignore[attr-defined,no-any-return]

    def to_diffusers(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write a folder that diffusers' ``DDPMPipeline.from_pretrained`` loads.

        Needs a network that wraps a diffusers model (:class:`DiffusersUNet`, as built by
        :meth:`from_diffusers`). Writes model_index.json, unet/ (config.json and
        diffusion_pytorch_model.safetensors, the weights bit for bit) and
        scheduler/scheduler_config.json, a DDPMScheduler with this model's schedule,
        prediction type and variance type (see :func:`scheduler_config_from_tinydiff`).

        Args:
            save_directory: the folder (created if needed).

        Returns:
            the folder.

        Raises:
            TypeError: the network is not a diffusers model.
            UnsupportedSchedulerError: a target or variance type diffusers has no name for.
        """
        diffusers = _import_diffusers()
        model: ModelLike = self  # type: ignore[assignment]
        net = model.nn_module
        unet = net.unet if isinstance(net, DiffusersUNet) else net
        if not isinstance(unet, diffusers.ModelMixin):
            raise TypeError(
                f"to_diffusers needs a network that is a diffusers model (a DiffusersUNet, as "
                f"made by DiffusionModel.from_diffusers); this model's network is "
                f"{type(net).__name__}. Save it with save_pretrained() instead"
            )
        scheduler = diffusers.DDPMScheduler(**scheduler_config_from_tinydiff(model))
        folder = Path(save_directory)
        pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
        pipeline.save_pretrained(str(folder), safe_serialization=True)
        return folder
