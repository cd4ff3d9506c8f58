r"""Bring a diffusers model: read diffusers UNet checkpoints and scheduler configs, write them back.

`DiffusersMixin` gives `tinydiff.DiffusionModel` the classmethod
`from_diffusers` and the method `to_diffusers`.
diffusers is an optional dependency (`pip install "tinydiff[diffusers]"`), imported only
when one of them is called.

Time convention. diffusers numbers the training steps k = 0..T-1 and its `alphas_cumprod[k]`
is tinydiff's $\bar\alpha_t$ at t = k + 1 (tinydiff's table has T + 1 entries with
$\bar\alpha_0 = 1$). `DiffusersUNet` therefore calls the UNet at k = t - 1, so a
tinydiff sampler that visits t evaluates exactly the network a diffusers scheduler evaluates
at k; fractional t (some spacings) give fractional k, which the UNet's sinusoidal embedding
accepts.

Betas. diffusers builds its betas and `alphas_cumprod` in float32; tinydiff evaluates the
same formulas in float64 (`linear`/`scaled_linear` with `rescale=False`,
`squaredcos_cap_v2` as `cosine`, `trained_betas` as the `betas` schedule). The tables
then agree to float32 rounding (about 1e-6 relative at T = 1000), and samples agree with
diffusers' own loops to about 1e-6 relative; see docs/diffusers.md for the measurements.

Flow matching and EDM. `FlowMatchEulerDiscreteScheduler` (and its Heun variant) becomes
the `rectified_flow` process with the config's shift and the `pred_velocity` target;
`EDMEulerScheduler` (and `EDMDPMSolverMultistepScheduler`) the `edm` path and target.
`DiffusersUNet`'s time map converts the network time and, for flow matching, the velocity
(diffusers' is $d x/d\sigma$, tinydiff's $d x/ds$); see its docstring.

The translation of scheduler options is the table `SCHEDULERS` (one entry per scheduler
class: the tinydiff sampler and a function for its own options, or the whole process) plus
the options shared by all discrete schedulers, handled in `translate_scheduler_config`;
`SAME_PROCESS_OTHER_SAMPLER` and `REFUSED` cover every other scheduler class of diffusers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from tinydiff._atomic import SAVE_ID_KEY, FolderWriter, SaveManifest, check_save_id, read_manifest
from tinydiff._safetensors import (
    SafetensorsFile,
    SerializationError,
    check_entries,
    load_json,
    read_regular_file,
)
from tinydiff._validation import check_int, check_number
from tinydiff.thresholding import ClipX0, DynamicThreshold

if TYPE_CHECKING:
    from tinydiff.denoiser import ModelLike

__all__ = [
    "REFUSED",
    "SAME_PROCESS_OTHER_SAMPLER",
    "SCHEDULERS",
    "TIME_MAPS",
    "DiffusersMixin",
    "DiffusersUNet",
    "SchedulerTranslation",
    "UnsupportedSchedulerError",
    "build_diffusers_model",
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

TIME_MAPS = ("discrete", "flow", "edm")
"""How `DiffusersUNet` turns tinydiff's network time into diffusers' timestep."""


class DiffusersUNet(nn.Module):
    r"""A diffusers UNet (`UNet2DModel`, `UNet2DConditionModel`, ...) as a tinydiff network.

    `forward(x_t, t, **cond)` returns the UNet's output tensor (the output object is
    unwrapped), converted between the conventions of the two libraries by `time_map`:

    * `"discrete"` (VP schedulers: DDPM, DDIM, Euler, DPM-Solver ...): tinydiff's t on
      [0, T] is diffusers' timestep k = t - 1; the output is unchanged.
    * `"flow"` (`FlowMatchEulerDiscreteScheduler`; tinydiff's `rectified_flow` with
      shift m): with s = t / T and $\sigma = m s / (1 + (m - 1) s)$ the UNet is called at
      diffusers' timestep $1000\,\sigma$ (`num_timesteps` times sigma), and its output,
      diffusers' velocity $d x / d\sigma = \epsilon - x_0$, is multiplied by
      $d\sigma/ds = m / (1 + (m - 1) s)^2$: tinydiff's `pred_velocity` target is the
      velocity in s (`tinydiff.targets.PredVelocity`).
    * `"edm"` (`EDMEulerScheduler`; tinydiff's `edm` path and target): the `edm`
      target already calls the network with Karras et al.'s $c_{noise} = \ln(\sigma)/4$,
      diffusers' timestep, and scaled input; the output is multiplied by `output_sign`
      (-1 for diffusers' `v_prediction`, whose $c_{out}$ has the opposite sign).

    `cond` is passed to the UNet as keyword arguments (e.g. `class_labels`,
    `encoder_hidden_states`).

    Args:
        unet: the diffusers model.
        time_map: one of `TIME_MAPS`.
        shift: m of the `"flow"` map (> 0).
        num_timesteps: T of the `"flow"` map: tinydiff's and diffusers' time scale.
        output_sign: +1 or -1, the sign of the output (`"edm"`).

    Attributes:
        time_options: the arguments after `unet` as a JSON-able dict (what a saved model
            needs to rebuild this wrapper).
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        time_map: str = "discrete",
        shift: float = 1.0,
        num_timesteps: int = 1000,
        output_sign: int = 1,
    ) -> None:
        super().__init__()
        if time_map not in TIME_MAPS:
            raise ValueError(f"time_map must be one of {TIME_MAPS}, got {time_map!r}")
        shift = check_number("shift", shift, owner="DiffusersUNet")
        if not shift > 0:
            raise ValueError(f"DiffusersUNet shift must be > 0, got {shift!r}")
        num_timesteps = check_int("num_timesteps", num_timesteps, min=1, owner="DiffusersUNet")
        if output_sign not in (1, -1) or isinstance(output_sign, bool):
            raise ValueError(f"DiffusersUNet output_sign must be 1 or -1, got {output_sign!r}")
        self.unet = unet
        self.time_map = time_map
        self.shift = shift
        self.num_timesteps = num_timesteps
        self.output_sign = int(output_sign)

    @property
    def time_options(self) -> dict[str, Any]:
        return {
            "time_map": self.time_map,
            "shift": self.shift,
            "num_timesteps": self.num_timesteps,
            "output_sign": self.output_sign,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.time_options.items())

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """x: (bsz, C, H, W); t: (bsz,) float, tinydiff's network time. Returns (bsz, C', H, W)."""
        scale: Tensor | None = None
        if self.time_map == "discrete":
            timestep = t - 1
        elif self.time_map == "flow":
            m, big_t = self.shift, self.num_timesteps
            s = t.to(torch.float64) / big_t
            denom = 1 + (m - 1) * s
            timestep = (big_t * m * s / denom).to(t.dtype)
            scale = (m / denom**2).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        else:
            timestep = t
        out = self.unet(x, timestep, return_dict=False, **cond)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if scale is not None:
            out = out * scale
        return out if self.output_sign == 1 else -out


# -- scheduler config translation -------------------------------------------------------------

_OWNER = "diffusers scheduler config"
#: num_train_timesteps above this is refused (no diffusers model uses more than a few thousand)
_MAX_TRAIN_TIMESTEPS = 1 << 20

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
    "variance_type",  # handled in translate_scheduler_config
}

#: options tinydiff does not model, with the value that is equivalent to tinydiff's behaviour;
#: another value is reported in a warning
_NEUTRAL: dict[str, Any] = {
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
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
}


@dataclass
class SchedulerTranslation:
    """The result of `translate_scheduler_config`.

    Attributes:
        config: keyword fields of `tinydiff.DiffusionModelConfig` (without
            `input_shape`), using `variance_type` for the variance type.
        ignored: `{option: value}` of the diffusers options that tinydiff does not model
            (`_class_name` for a scheduler without a tinydiff sampler; reported in a warning
            by `DiffusersMixin.from_diffusers`).
        network: the keyword arguments of `DiffusersUNet` after `unet` (the time
            map and velocity convention of the scheduler's family).
    """

    config: dict[str, Any]
    ignored: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=lambda: {"time_map": "discrete"})


#: `options -> (config fields, consumed option names)`: the fields (`sampler_type`,
#: `sampler_kwargs`, or any other) replace those of the shared translation. A rule that
#: returns `noise_schedule_type` translates the whole process itself (flow matching, EDM):
#: the discrete-VP options are then not read, and its `"_network"` field, if any, gives the
#: `DiffusersUNet` options.
SchedulerRule = Callable[[Mapping[str, Any]], tuple[dict[str, Any], set[str]]]


# typed readers of one option: a wrong type is a TypeError, a wrong value a ValueError, both
# naming the option; nothing is coerced


def _int(options: Mapping[str, Any], key: str, default: int, *, low: int, high: int) -> int:
    return check_int(key, options.get(key, default), min=low, max=high, owner=_OWNER)


def _positive(options: Mapping[str, Any], key: str, default: float) -> float:
    value = check_number(key, options.get(key, default), owner=_OWNER)
    if not value > 0:
        raise ValueError(f"{_OWNER} {key} must be > 0, got {options.get(key, default)!r}")
    return value


def _typed(options: Mapping[str, Any], key: str, default: Any, kind: type, what: str) -> Any:
    """``options[key]`` (or ``default``), which must be a ``kind``; TypeError naming it."""
    value = options.get(key, default)
    if not isinstance(value, kind):
        raise TypeError(
            f"{_OWNER} {key} must be {what}, got {value!r:.80} ({type(value).__name__})"
        )
    return value


def _flag(options: Mapping[str, Any], key: str, default: bool) -> bool:
    return _typed(options, key, default, bool, "true or false")  # type: ignore[no-any-return]


def _text(options: Mapping[str, Any], key: str, default: str) -> str:
    return _typed(options, key, default, str, "a string")  # type: ignore[no-any-return]


def _fixed(name: str) -> SchedulerRule:
    return lambda options: ({"sampler_type": name}, set())


def _dpm_solver(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    algorithm = _text(options, "algorithm_type", "dpmsolver++")
    order = _int(options, "solver_order", 2, low=1, high=3)
    solver_type = _text(options, "solver_type", "midpoint")
    _flag(options, "lower_order_final", True)
    names = {
        ("dpmsolver++", 2): "dpmpp_2m",
        ("dpmsolver++", 3): "dpmpp_3m",
        ("dpmsolver++", 1): "ddim",
        ("sde-dpmsolver++", 2): "dpmpp_2m_sde",
    }
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
        "order": _int(options, "solver_order", 2, low=1, high=3),
        "variant": _text(options, "solver_type", "bh2"),
        "lower_order_final": _flag(options, "lower_order_final", True),
        "rho": 0.5,  # diffusers fixes the single UniPC coefficient at its small-h limit 1/2
    }
    fields = {"sampler_type": "unipc", "sampler_kwargs": kwargs}
    return fields, {"solver_order", "solver_type", "lower_order_final"}


def _flow_shift(options: Mapping[str, Any]) -> float:
    """The shift m of a FlowMatch config: `shift`, or from `mu` with dynamic shifting."""
    if not _flag(options, "use_dynamic_shifting", False):
        if options.get("mu") is not None:
            raise ValueError(
                "mu is only used with use_dynamic_shifting=True; this scheduler config has a "
                f"fixed shift={options.get('shift', 1.0)!r}: drop mu"
            )
        return _positive(options, "shift", 1.0)
    if options.get("mu") is None:
        raise UnsupportedSchedulerError(
            "this FlowMatch scheduler config has use_dynamic_shifting=True: its shift depends on "
            "the image resolution (diffusers' pipelines compute mu from the number of image "
            "tokens at each call), while a tinydiff model has one fixed process. Pass the mu of "
            "the resolution you sample at: from_diffusers(..., mu=...) (shift = exp(mu) for "
            "time_shift_type='exponential', shift = mu for 'linear')"
        )
    mu = check_number("mu", options["mu"], owner="from_diffusers")
    kind = _text(options, "time_shift_type", "exponential")
    if kind == "exponential":
        if mu > 700:
            raise ValueError(
                f"from_diffusers mu={mu!r} gives shift exp(mu) = inf; expected mu < 700"
            )
        return math.exp(mu)
    if kind == "linear":
        if not mu > 0:
            raise ValueError(
                f"from_diffusers mu must be > 0 with time_shift_type='linear', got {mu!r}"
            )
        return mu
    raise ValueError(
        f"{_OWNER} time_shift_type must be 'exponential' or 'linear', got {kind!r:.80}"
    )


def _flow(sampler: str) -> SchedulerRule:
    """Rectified flow (FlowMatchEuler/Heun): the process, the velocity target, the time map."""

    def rule(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        num = _int(options, "num_train_timesteps", 1000, low=1, high=_MAX_TRAIN_TIMESTEPS)
        shift = _flow_shift(options)
        fields = {
            "num_timesteps": num,
            "noise_schedule_type": "rectified_flow",
            "schedule_kwargs": {"shift": shift},
            "target_type": "pred_velocity",
            "sampler_type": sampler,
            "timestep_spacing": "uniform",
            "_network": {"time_map": "flow", "shift": shift, "num_timesteps": num},
        }
        consumed = {
            "num_train_timesteps",
            "shift",
            "mu",
            "use_dynamic_shifting",
            "base_shift",
            "max_shift",
            "base_image_seq_len",
            "max_image_seq_len",
        }
        if options.get("use_dynamic_shifting", False):
            consumed.add("time_shift_type")
        return fields, consumed

    return rule


def _edm(sampler: SchedulerRule) -> SchedulerRule:
    """EDM (EDMEuler, EDMDPMSolverMultistep): the `edm` path and preconditioning target."""

    def rule(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        num = _int(options, "num_train_timesteps", 1000, low=1, high=_MAX_TRAIN_TIMESTEPS)
        kwargs = {k: _positive(options, k, d) for k, d in _EDM_DEFAULTS.items()}
        sigma_data = _positive(options, "sigma_data", 0.5)
        prediction = _text(options, "prediction_type", "epsilon")
        signs = {"epsilon": 1, "v_prediction": -1}
        if prediction not in signs:
            raise UnsupportedSchedulerError(
                f"{_OWNER} prediction_type={prediction!r:.80} is not an EDM prediction type; "
                f"expected one of {sorted(signs)}"
            )
        own, consumed = sampler(options)
        fields = {
            "num_timesteps": num,
            "noise_schedule_type": "edm",
            "schedule_kwargs": kwargs,
            "target_type": "edm",
            "target_kwargs": {"sigma_data": sigma_data},
            "timestep_spacing": "uniform",  # unrounded even t: Karras et al.'s eq. 5 levels
            **own,
            "_network": {"time_map": "edm", "output_sign": signs[prediction]},
        }
        consumed |= {"num_train_timesteps", "sigma_data", "prediction_type", *_EDM_DEFAULTS}
        if _text(options, "sigma_schedule", "karras") == "karras":
            consumed.add("sigma_schedule")
        final = _text(options, "final_sigmas_type", "zero")
        if final in ("zero", "sigma_min"):  # see the module docstring: EDM ends at sigma_min
            consumed.add("final_sigmas_type")
        return fields, consumed

    return rule


_EDM_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def _refused(message: str) -> SchedulerRule:
    def rule(options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        raise UnsupportedSchedulerError(message)

    return rule


#: scheduler class name -> rule giving the tinydiff sampler and its options (and, for the
#: flow-matching and EDM families, the whole process). Add an entry to support another
#: scheduler.
SCHEDULERS: dict[str, SchedulerRule] = {
    "DDPMScheduler": _fixed("ddpm"),
    "DDIMScheduler": _fixed("ddim"),
    "EulerDiscreteScheduler": _fixed("euler"),
    "HeunDiscreteScheduler": _fixed("heun"),
    "DPMSolverMultistepScheduler": _dpm_solver,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _fixed("deis"),
    "FlowMatchEulerDiscreteScheduler": _flow("euler"),
    "FlowMatchHeunDiscreteScheduler": _flow("heun"),
    "EDMEulerScheduler": _edm(_fixed("euler")),
    "EDMDPMSolverMultistepScheduler": _edm(_dpm_solver),
}

SAME_PROCESS_OTHER_SAMPLER = frozenset(
    {
        "DDIMInverseScheduler",
        "DDIMParallelScheduler",
        "DDPMParallelScheduler",
        "DPMSolverMultistepInverseScheduler",
        "DPMSolverSDEScheduler",
        "DPMSolverSinglestepScheduler",
        "EulerAncestralDiscreteScheduler",
        "IPNDMScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
        "PNDMScheduler",
        "RePaintScheduler",
        "SASolverScheduler",
        "UnCLIPScheduler",
    }
)
"""Schedulers of a discrete-VP (beta table) model whose sampler tinydiff does not have: the
process is translated, the sampler stays tinydiff's default, and the class is named in the
"not modelled" warning."""

_NOT_GAUSSIAN = (
    "is not a Gaussian diffusion scheduler (it samples discrete tokens); tinydiff models "
    "Gaussian diffusion and flow processes only"
)
_DISTILLED = (
    "belongs to a consistency- or trajectory-distilled model, which is sampled with its own "
    "few-step rule (the network is no longer a denoiser of one Gaussian path); tinydiff has "
    "no such sampler. Use diffusers' pipeline for it"
)

REFUSED: dict[str, str] = {
    "AmusedScheduler": _NOT_GAUSSIAN,
    "VQDiffusionScheduler": _NOT_GAUSSIAN,
    "BlockRefinementScheduler": _NOT_GAUSSIAN,
    "DiscreteDDIMScheduler": _NOT_GAUSSIAN,
    "EntropyBoundScheduler": _NOT_GAUSSIAN,
    "RFD4ProteinaScheduler": "is a protein-structure flow (frames and coordinates, not a "
    "Gaussian path on one tensor); tinydiff has no equivalent",
    "LCMScheduler": _DISTILLED,
    "TCDScheduler": _DISTILLED,
    "FlowMatchLCMScheduler": _DISTILLED,
    "CMStochasticIterativeScheduler": _DISTILLED,
    "SCMScheduler": _DISTILLED + " (TrigFlow parameterization)",
    "FlowMapEulerDiscreteScheduler": _DISTILLED + " (a flow map, not a velocity field)",
    "PiflowScheduler": _DISTILLED + " (a policy-based flow)",
    "HeliosDMDScheduler": _DISTILLED + " (multi-stage distribution-matching distillation)",
    "HeliosScheduler": "samples a multi-stage (pyramid) flow whose stages change the "
    "resolution; tinydiff's processes keep one input shape",
    "MiniMaxH3Scheduler": "has a model-specific sampling rule without a translatable process "
    "config; tinydiff has no equivalent",
    "LTXEulerAncestralRFScheduler": "is a stochastic rectified-flow sampler for LTX video "
    "models whose sigmas come from the pipeline; tinydiff cannot read its process from the "
    "config. Build a rectified_flow model with the pipeline's shift instead",
    "CogVideoXDDIMScheduler": "shifts the SNR of its beta table (snr_shift_scale), which has no "
    "tinydiff schedule; CogVideoX is a video transformer, not a UNet",
    "CogVideoXDPMScheduler": "shifts the SNR of its beta table (snr_shift_scale), which has no "
    "tinydiff schedule; CogVideoX is a video transformer, not a UNet",
    "CosineDPMSolverMultistepScheduler": "preconditions the network with a cosine time "
    "(c_noise = atan(sigma / sigma_data) / (pi / 2)), not EDM's ln(sigma) / 4; tinydiff's "
    "edm target cannot call such a network",
    "DDPMWuerstchenScheduler": "uses Wuerstchen's continuous cosine time convention (r in "
    "[0, 1] with its own offset), which tinydiff's network wrapper does not map",
    "KarrasVeScheduler": "is deprecated in diffusers and stores no process config; for an EDM "
    "model use EDMEulerScheduler's config",
    "ScoreSdeVeScheduler": "is a geometric variance-exploding SDE (Song et al. 2021) whose "
    "network takes sigma, not a time; tinydiff has no geometric VE path",
}
"""Scheduler classes tinydiff cannot represent, with the reason."""


def _schedule(options: Mapping[str, Any], num_timesteps: int) -> tuple[str, dict[str, Any]]:
    trained = options.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, (list, tuple)) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained
        ):
            raise TypeError(
                f"{_OWNER} trained_betas must be a list of numbers, got {trained!r:.80} "
                f"({type(trained).__name__})"
            )
        if len(trained) != num_timesteps:
            raise ValueError(
                f"{_OWNER} trained_betas has {len(trained)} values but num_train_timesteps="
                f"{num_timesteps}; they must agree"
            )
        return "betas", {"betas": [float(b) for b in trained]}
    kind = _text(options, "beta_schedule", "linear")
    start = check_number("beta_start", options.get("beta_start", 1e-4), owner=_OWNER)
    end = check_number("beta_end", options.get("beta_end", 0.02), owner=_OWNER)
    if kind == "linear":
        return "linear", {"beta_start": start, "beta_end": end, "rescale": False}
    if kind == "scaled_linear":
        return "scaled_linear", {"beta_start": start, "beta_end": end, "rescale": False}
    if kind == "squaredcos_cap_v2":
        return "cosine", {}  # Nichol & Dhariwal's s = 0.008, betas capped at 0.999: the same
    raise UnsupportedSchedulerError(
        f"beta_schedule={kind!r:.80} has no tinydiff equivalent; supported: 'linear', "
        "'scaled_linear', 'squaredcos_cap_v2', or explicit trained_betas"
    )


def _vp(
    options: Mapping[str, Any], class_name: str
) -> tuple[dict[str, Any], set[str], dict[str, Any]]:
    """The discrete-VP fields shared by the beta-table schedulers: (fields, consumed, ignored)."""
    ignored: dict[str, Any] = {}
    num_timesteps = _int(options, "num_train_timesteps", 1000, low=1, high=_MAX_TRAIN_TIMESTEPS)
    schedule, schedule_kwargs = _schedule(options, num_timesteps)
    prediction = _text(options, "prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        hint = (
            " (flow_prediction: a flow-matching model; its FlowMatchEulerDiscreteScheduler "
            "config, with shift = flow_shift, is translated)"
            if prediction == "flow_prediction"
            else ""
        )
        raise UnsupportedSchedulerError(
            f"prediction_type={prediction!r:.80} is not supported; expected one of "
            f"{sorted(_PREDICTION)}{hint}"
        )
    config: dict[str, Any] = {
        "num_timesteps": num_timesteps,
        "noise_schedule_type": schedule,
        "schedule_kwargs": schedule_kwargs,
        "target_type": _PREDICTION[prediction],
        "zero_terminal_snr": _flag(options, "rescale_betas_zero_snr", False),
    }
    variance = options.get("variance_type")
    if variance is not None:
        variance = _text(options, "variance_type", "")
        if variance not in _VARIANCE:
            raise UnsupportedSchedulerError(
                f"variance_type={variance!r:.80} is not supported; expected one of "
                f"{sorted(_VARIANCE)} (or none)"
            )
        config["variance_type"] = _VARIANCE[variance]
    elif class_name == "DDPMScheduler":
        config["variance_type"] = "lower_bound"  # DDPMScheduler's default, fixed_small
    consumed = {
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
        "timestep_spacing",
        "use_karras_sigmas",
    }
    spacing = _text(options, "timestep_spacing", "leading")
    offset = options.get("steps_offset", 0)
    if _flag(options, "use_karras_sigmas", False):
        config["timestep_spacing"] = "karras"
    elif spacing in _SPACING and (spacing != "leading" or offset == 0):
        config["timestep_spacing"] = _SPACING[spacing]
        consumed.add("steps_offset")
    else:
        ignored["timestep_spacing"] = spacing
    return config, consumed, ignored


#: diffusers' options for limiting x0, mapped to tinydiff.thresholding
_X0_LIMIT_KEYS = {
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "clip_sample",
    "clip_sample_range",
}


def _x0_limit(options: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """``clip_x0`` / ``dynamic_threshold`` from diffusers' options: thresholding when on, else
    clip_sample (on by default for DDPMScheduler and DDIMScheduler), as diffusers applies
    them."""
    if _flag(options, "thresholding", False):
        ratio = _positive(options, "dynamic_thresholding_ratio", 0.995)
        return {"dynamic_threshold": (ratio, _positive(options, "sample_max_value", 1.0))}
    if _flag(options, "clip_sample", class_name in ("DDPMScheduler", "DDIMScheduler")):
        limit = _positive(options, "clip_sample_range", 1.0)
        return {"clip_x0": (-limit, limit)}
    return {}


def translate_scheduler_config(
    options: Mapping[str, Any], *, mu: float | None = None
) -> SchedulerTranslation:
    """Translate a diffusers scheduler config (`scheduler_config.json`) into tinydiff config fields.

    Three families are translated (see docs/diffusers.md for the table): the discrete-VP
    schedulers (beta tables; DDPM, DDIM, Euler, DPM-Solver, UniPC, ...), flow matching
    (`FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler`: the
    `rectified_flow` process with the config's shift, `pred_velocity`, and the `"flow"`
    network time map) and EDM (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: the
    `edm` path and target, the `"edm"` map). Schedulers tinydiff cannot represent
    (`REFUSED`) raise with the reason.

    Args:
        options: the config dict; `_class_name` picks the sampler (default: DDPMScheduler).
        mu: for a flow-matching config with `use_dynamic_shifting=True`: the mu of the
            resolution to sample at (diffusers' `set_timesteps(mu=...)`); the shift is then
            exp(mu) (`time_shift_type="exponential"`) or mu (`"linear"`).

    Returns:
        the fields, the options tinydiff does not model, and the network's time map.

    Raises:
        UnsupportedSchedulerError: a scheduler or option value tinydiff cannot represent.
        TypeError, ValueError: a malformed option (wrong type or value), named in the message.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"{_OWNER} must be a JSON object (a dict), got {type(options).__name__}")
    class_name = _text(options, "_class_name", "DDPMScheduler")
    if class_name in REFUSED:
        raise UnsupportedSchedulerError(f"{class_name} {REFUSED[class_name]}")
    if mu is not None:
        options = {**options, "mu": mu}
    rule = SCHEDULERS.get(class_name)
    ignored: dict[str, Any] = {}
    if rule is None:  # the schedule is still translated; the sampler stays tinydiff's default
        own: dict[str, Any] = {}
        consumed: set[str] = set()
        ignored["_class_name"] = class_name
    else:
        own, consumed = rule(options)
    network = own.pop("_network", {"time_map": "discrete"})
    if "noise_schedule_type" in own:  # the rule translated the whole process
        config = own
    else:
        config, shared, ignored_vp = _vp(options, class_name)
        consumed |= shared
        ignored.update(ignored_vp)
        config.update(own)
    config.update(_x0_limit(options, class_name))
    consumed |= _X0_LIMIT_KEYS
    for key, value in options.items():
        if key in consumed or key in _IGNORED or str(key).startswith("_"):  # _: bookkeeping
            continue
        if key not in _NEUTRAL or not _same(value, _NEUTRAL[key]):
            ignored[key] = value  # unknown to tinydiff, or a value tinydiff does not model
    return SchedulerTranslation(config, ignored, network)


def _same(value: Any, neutral: Any) -> bool:
    """`value == neutral` without coercion (True is not 1, 1.0 is 1)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    try:
        return bool(value == neutral)
    except Exception:  # an exotic object: not neutral
        return False


def _check_time_map(cfg: Any, net: DiffusersUNet) -> None:
    """The flow and EDM time maps hold only for the process they were made for (e.g. after
    `config_overrides`): a different shift, T, path or target would call the UNet at wrong
    times or misread its output."""
    if net.time_map == "flow":
        shift = (
            cfg.schedule_kwargs.get("shift", 1.0) if isinstance(cfg.schedule_kwargs, dict) else None
        )
        ok = (
            cfg.noise_schedule_type == "rectified_flow"
            and cfg.target_type == "pred_velocity"
            and isinstance(shift, (int, float))
            and math.isclose(float(shift), net.shift, rel_tol=1e-12)
            and cfg.num_timesteps == net.num_timesteps
        )
        want = (
            f"noise_schedule_type='rectified_flow' with shift {net.shift}, target_type="
            f"'pred_velocity' and num_timesteps={net.num_timesteps}"
        )
    elif net.time_map == "edm":
        ok = cfg.noise_schedule_type == "edm" and cfg.target_type == "edm"
        want = "noise_schedule_type='edm' and target_type='edm'"
    else:
        return
    if not ok:
        raise UnsupportedSchedulerError(
            f"this diffusers network is called with the {net.time_map!r} time map, which needs "
            f"{want}; the config has noise_schedule_type={cfg.noise_schedule_type!r}, "
            f"schedule_kwargs={cfg.schedule_kwargs!r:.80}, target_type={cfg.target_type!r}, "
            f"num_timesteps={cfg.num_timesteps}. Keep these fields out of config_overrides"
        )


def _scheduler_for(model: ModelLike) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class name, its options) for `model`'s process and network."""
    cfg = model.config
    net = model.nn_module
    time_map = net.time_map if isinstance(net, DiffusersUNet) else "discrete"
    family = {"rectified_flow": "flow", "edm": "edm"}.get(cfg.noise_schedule_type, "discrete")
    if family != time_map:
        raise UnsupportedSchedulerError(
            f"this model's process is {cfg.noise_schedule_type!r} but its network is called "
            f"with the {time_map!r} time map of DiffusersUNet; a diffusers scheduler for it "
            f"needs the {family!r} map (as built by from_diffusers from a "
            f"{_FAMILY_EXAMPLE[family]} config)"
        )
    if family == "discrete":
        return "DDPMScheduler", scheduler_config_from_tinydiff(model)
    assert isinstance(net, DiffusersUNet)
    _check_time_map(cfg, net)
    if family == "flow":
        shift = float(cfg.schedule_kwargs.get("shift", 1.0))
        if cfg.target_type != "pred_velocity" or not math.isclose(shift, net.shift, rel_tol=1e-12):
            raise UnsupportedSchedulerError(
                "a rectified_flow model is written as FlowMatchEulerDiscreteScheduler only with "
                f"target_type='pred_velocity' and the network's shift ({net.shift}) equal to the "
                f"schedule's ({shift}); got target_type={cfg.target_type!r}"
            )
        name = (
            "FlowMatchHeunDiscreteScheduler"
            if cfg.sampler_type == "heun"
            else ("FlowMatchEulerDiscreteScheduler")
        )
        return name, {"num_train_timesteps": net.num_timesteps, "shift": shift}
    if cfg.target_type != "edm":
        raise UnsupportedSchedulerError(
            f"an edm model is written as EDMEulerScheduler only with target_type='edm' "
            f"(Karras et al.'s preconditioning); got {cfg.target_type!r}"
        )
    options = {
        "num_train_timesteps": cfg.num_timesteps,
        **{k: float(cfg.schedule_kwargs.get(k, d)) for k, d in _EDM_DEFAULTS.items()},
        "sigma_data": float(cfg.target_kwargs.get("sigma_data", 0.5)),
        "prediction_type": "epsilon" if net.output_sign == 1 else "v_prediction",
        "final_sigmas_type": "sigma_min",
    }
    if cfg.sampler_type == "dpmpp_2m":
        return "EDMDPMSolverMultistepScheduler", options
    return "EDMEulerScheduler", options


_FAMILY_EXAMPLE = {
    "discrete": "DDPMScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
    "edm": "EDMEulerScheduler",
}


def _x0_limit_options(cfg: Any) -> dict[str, Any]:
    """diffusers' clip_sample / thresholding options for the config's x0 limit."""
    limit = cfg.x0_limit()
    if isinstance(limit, DynamicThreshold):
        return {
            "clip_sample": False,
            "thresholding": True,
            "dynamic_thresholding_ratio": limit.percentile,
            "sample_max_value": limit.max_value,
        }
    if isinstance(limit, ClipX0):
        if limit.lo != -limit.hi:
            raise UnsupportedSchedulerError(
                f"clip_x0={cfg.clip_x0} is not symmetric; diffusers' clip_sample_range clips to "
                "[-r, r]: use clip_x0=r"
            )
        return {"clip_sample": True, "clip_sample_range": limit.hi}
    return {"clip_sample": False, "thresholding": False}


def scheduler_config_from_tinydiff(model: ModelLike) -> dict[str, Any]:
    """The DDPMScheduler options equivalent to `model`'s diffusion process.

    Named schedules are written by name when diffusers has them (`linear`/`scaled_linear`
    with `rescale=False` or T = 1000, `cosine` with its defaults); any other schedule is
    written as `trained_betas` (exact up to diffusers' float32).
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
        **_x0_limit_options(cfg),
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

#: the largest config.json / scheduler_config.json / model_index.json / index read
_MAX_JSON_BYTES = 4 << 20
#: integers in a UNet config beyond this are refused before diffusers builds anything
_MAX_CONFIG_INT = 1 << 24
#: `*layers*` counts and list lengths beyond these are refused (building that many modules,
#: even on the meta device, would take minutes)
_MAX_LAYERS = 1024
_MAX_CONFIG_LIST = 256
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_STALE = ("diffusion_pytorch_model.bin",)


@dataclass
class _SaveCheck:
    """The manifest of a pipeline folder written by `to_diffusers` (None: a folder without
    one): every file read from it must carry that save's id, so that a folder whose save was
    interrupted is refused (MixedSaveError) rather than loaded as a mix."""

    root: Path
    manifest: SaveManifest | None

    def __call__(self, path: Path, found: Any) -> None:
        try:
            name = path.relative_to(self.root).as_posix()
        except ValueError:  # a file given from elsewhere (scheduler_config=...)
            return
        check_save_id(self.manifest, self.root, name, found)


def _read_json(path: Path, what: str = "config", check: _SaveCheck | None = None) -> dict[str, Any]:
    """A JSON object from a regular file, size- and depth-bounded (SerializationError)."""
    data = read_regular_file(path, _MAX_JSON_BYTES, what)
    doc = load_json(data, str(path), allow_infinity=True)  # diffusers writes -Infinity
    if not isinstance(doc, dict):
        raise SerializationError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    found = doc.pop(SAVE_ID_KEY, None)
    if check is not None:
        check(path, found)
    return doc


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
) -> tuple[Path, dict[str, Any], _SaveCheck | None]:
    """(UNet folder, scheduler options) of a pipeline or bare UNet folder. Anything present
    under an expected name is read as that file (a FIFO or a device is an error, never
    skipped)."""
    index = folder / "model_index.json"
    check = None
    if os.path.lexists(index):
        check = _SaveCheck(folder, read_manifest(folder))
        components = _read_json(index, "pipeline index", check)
        unet_name = next(
            (k for k in ("unet", "transformer") if isinstance(components.get(k), list)), None
        )
        if unet_name is None:
            raise ValueError(
                f"{index} names no 'unet' component (found {sorted(components)[:20]}); "
                "tinydiff reads pipelines whose denoiser is a diffusers UNet"
            )
        unet_dir = folder / unet_name
        if scheduler_config is None:
            scheduler_config = folder / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = folder
        if scheduler_config is None:
            scheduler_config = folder / "scheduler_config.json"
            if not os.path.lexists(scheduler_config):
                raise FileNotFoundError(
                    f"{folder} is neither a pipeline folder (no model_index.json) nor a UNet "
                    "folder with a scheduler_config.json beside its config.json; pass the "
                    "scheduler with scheduler_config=path_or_dict"
                )
    if isinstance(scheduler_config, Mapping):
        options = dict(scheduler_config)
    elif isinstance(scheduler_config, (str, os.PathLike)):
        path = Path(scheduler_config)
        if path.is_dir():
            path = path / "scheduler_config.json"
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no scheduler config at {path}")
        options = _read_json(path, "scheduler config", check)
    else:
        raise TypeError(
            "scheduler_config must be a dict, a path to scheduler_config.json or its folder, "
            f"or None; got {type(scheduler_config).__name__}"
        )
    if not os.path.lexists(unet_dir / "config.json"):
        raise FileNotFoundError(f"no UNet config.json in {unet_dir}")
    return unet_dir, options, check


def _check_unet_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse sizes no real model has before diffusers builds anything (stack-free walk)."""
    stack: list[tuple[str, Any]] = list(config.items())
    while stack:
        key, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            limit = _MAX_LAYERS if "layers" in key else _MAX_CONFIG_INT
            if abs(value) > limit:
                raise ValueError(
                    f"{where}: {key}={value} is beyond any diffusers model (at most {limit}); "
                    "the config is corrupt or not a diffusers model config"
                )
        elif isinstance(value, (list, tuple)):
            if len(value) > _MAX_CONFIG_LIST:
                raise ValueError(
                    f"{where}: {key} has {len(value)} entries (at most {_MAX_CONFIG_LIST}); "
                    "the config is corrupt"
                )
            stack.extend((key, v) for v in value)
        elif isinstance(value, Mapping):
            stack.extend((f"{key}.{k}", v) for k, v in value.items())


def build_diffusers_model(
    config: Mapping[str, Any], *, device: str | torch.device = "cpu", where: str = "config"
) -> nn.Module:
    """A diffusers model built from its config (randomly initialised), e.g. on the meta device.

    Args:
        config: the model's config.json (`_class_name` names a diffusers model class,
            default `UNet2DModel`).
        device: where to build it; `"meta"` allocates nothing.
        where: the config's name, for messages.

    Raises:
        SerializationError: no diffusers model class of that name, or diffusers cannot build
            it from this config.
        ValueError: a size beyond any real model (checked before building).
    """
    diffusers = _import_diffusers()
    class_name = config.get("_class_name", "UNet2DModel")
    cls: Any = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise SerializationError(
            f"{where} names _class_name={class_name!r:.80}, which is not a diffusers model "
            "class (expected e.g. 'UNet2DModel')"
        )
    _check_unet_config(config, where)
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' notes on unused keys
            model: nn.Module = cls.from_config(dict(config))  # type: ignore[attr-defined]
    except Exception as err:  # any failure inside diffusers' constructor
        raise SerializationError(
            f"{where}: diffusers cannot build {class_name} from this config "
            f"({type(err).__name__}: {str(err)[:300]}); the config is malformed"
        ) from err
    return model


def _weight_files(unet_dir: Path, check: _SaveCheck | None) -> dict[str, Path]:
    """tensor name -> file for sharded weights; {"": file} for one file."""
    single = unet_dir / _WEIGHTS
    if os.path.lexists(single):
        return {"": single}
    index = unet_dir / _WEIGHTS_INDEX
    if not os.path.lexists(index):
        raise FileNotFoundError(
            f"no {_WEIGHTS} (or its sharded index) in {unet_dir}: tinydiff only reads "
            "safetensors (never pickled .bin files). Convert them once with diffusers: "
            "Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )
    weight_map = _read_json(index, "weights index", check).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str)
        and v.endswith(".safetensors")
        and "/" not in v
        and "\\" not in v
        and not v.startswith(".")
        for v in weight_map.values()
    ):
        raise SerializationError(
            f"{index}: weight_map must map tensor names to .safetensors file names in the "
            "same folder"
        )
    return {k: unet_dir / v for k, v in weight_map.items()}


def _load_unet(
    unet_dir: Path, torch_dtype: torch.dtype | None, check: _SaveCheck | None = None
) -> nn.Module:
    """Build the UNet on the meta device, check it against the safetensors headers, then
    allocate it and load the weights (strictly)."""
    config_path = unet_dir / "config.json"
    config = _read_json(config_path, "UNet config", check)
    where = str(config_path)
    expected = build_diffusers_model(config, device="meta", where=where).state_dict()
    files = _weight_files(unet_dir, check)
    cap = (64 << 10) + 1024 * 2 * len(expected)
    opened: dict[Path, SafetensorsFile] = {}
    hint = "the weights do not belong to this config (or the config was edited)"
    try:
        for path in sorted(set(files.values())):
            opened[path] = SafetensorsFile(path, max_header_bytes=cap, what="UNet weights")
            if check is not None:
                check(path, opened[path].metadata.get(SAVE_ID_KEY))
        found: dict[str, Path] = {}
        for path, file in opened.items():
            for key in file.entries:
                if "" not in files and files.get(key) != path:
                    raise SerializationError(
                        f"{path} holds {key!r}, which the sharded index does not map to it"
                    )
                found[key] = path
        problems = sorted(set(expected) ^ set(found))
        if problems:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            raise SerializationError(
                f"the UNet weights in {unet_dir} do not match {where}: missing keys "
                f"{missing[:12]} ({len(missing)}), unexpected keys {extra[:12]} ({len(extra)}); "
                + hint
            )
        for path, file in opened.items():
            mine = {k: expected[k] for k, p in found.items() if p == path}
            check_entries(
                mine,
                file,
                {k: k for k in mine},
                what=where,
                strict=False,
                exact_dtype=False,
                hint=hint,
            )
        # sizes now match files that safetensors checked against their length: allocate
        unet = build_diffusers_model(config, device="cpu", where=where)
        if torch_dtype is not None:
            unet.to(torch_dtype)
        state = {k: opened[p].get(k) for k, p in found.items()}
        unet.load_state_dict(state, strict=True)
    finally:
        for file in opened.values():
            file.close()
    unet.eval()
    return unet


def _input_shape(unet: nn.Module) -> tuple[int, ...]:
    cfg = getattr(unet, "config", None)
    channels = getattr(cfg, "in_channels", None)
    size = getattr(cfg, "sample_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    ok_size = (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    )
    ok_channels = isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1
    if not (ok_size and ok_channels):
        raise ValueError(
            "cannot infer input_shape from the UNet config: it needs in_channels (an int >= 1, "
            f"got {channels!r:.40}) and sample_size (an int or [height, width], got "
            f"{size!r:.40}); pass input_shape=(C, H, W)"
        )
    assert isinstance(size, (list, tuple)) and isinstance(channels, int)
    return (channels, int(size[0]), int(size[1]))


def _scratch_prefix(folder: Path, pid: int | None = None) -> str:
    """`.<name>.tinydiff-scratch-<host>-<pid>-`: whose scratch folder it is."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f".{folder.name}.tinydiff-scratch-{host}-{os.getpid() if pid is None else pid}-"


def _remove_dead_scratch(folder: Path) -> None:
    """Remove the scratch folders that a `to_diffusers` of this machine left beside ``folder``
    when its process was killed (the process no longer exists)."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    mine = _scratch_prefix(folder, 0)[:-2]  # up to the pid
    with contextlib.suppress(OSError):
        for path in folder.parent.iterdir():
            pid = path.name[len(mine) :].split("-", 1)[0]
            if not (path.name.startswith(mine) and pid.isdigit() and path.is_dir()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except (OSError, OverflowError):
                pass  # alive (another user's), or not a pid


class DiffusersMixin:
    """Adds `from_diffusers` and `to_diffusers` to `tinydiff.DiffusionModel`."""

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
        mu: float | None = None,
    ) -> Self:
        """Load a diffusers UNet and its scheduler config as a `DiffusionModel`.

        The network is a `DiffusersUNet` (output unwrapped, times and the velocity
        convention converted for the scheduler's family); the config is
        `translate_scheduler_config`'s translation of the scheduler config, and scheduler
        options tinydiff does not model are named in one warning.

        Loading is bounded like `from_pretrained`: the JSON files
        are read size- and depth-bounded from regular files only; the UNet is built on the
        meta device and its tensor names, shapes and dtypes are checked against the
        safetensors headers before anything is allocated; only safetensors are read.

        Args:
            path_or_repo: a pipeline folder (model_index.json, scheduler/, unet/), a UNet
                folder (config.json and safetensors weights; the scheduler config beside it
                as scheduler_config.json, or given with `scheduler_config`), or a Hub
                repository id of either.
            subfolder: a folder inside `path_or_repo` holding the above.
            revision: Hub branch, tag or commit.
            scheduler_config: a scheduler config to use instead of the folder's: a dict, a
                scheduler_config.json file, or its folder.
            input_shape: (C, H, W); default from the UNet's in_channels and sample_size.
            config_overrides: fields of `DiffusionModelConfig` that replace the
                translated ones (e.g. `{"sampler_type": "dpmpp_2m"}`).
            torch_dtype: dtype to load the UNet in (default: float32, diffusers' default).
            token, cache_dir, local_files_only: as for `huggingface_hub.snapshot_download`.
            device: where to put the model.
            mu: for a flow-matching scheduler with `use_dynamic_shifting=True`: the mu of the
                resolution you sample at (what the diffusers pipeline passes to
                `set_timesteps`); the fixed shift is exp(mu) (or mu for
                `time_shift_type="linear"`). Without it such a config is refused.

        Returns:
            the model.

        Raises:
            UnsupportedSchedulerError: a scheduler or option tinydiff cannot represent.
            SerializationError: a malformed, oversized or non-regular file, or weights that do
                not match the UNet config.
            TypeError, ValueError: a malformed scheduler option, named in the message.
            FileNotFoundError: no such folder, no scheduler config, or no safetensors weights.
            ImportError: diffusers is not installed.
        """
        from tinydiff.config import DiffusionModelConfig

        folder = _resolve(path_or_repo, subfolder, revision, token, cache_dir, local_files_only)
        unet_dir, options, check = _find_parts(folder, scheduler_config)
        translation = translate_scheduler_config(options, mu=mu)  # before any weights: fail fast
        fields = dict(translation.config)
        unet = _load_unet(unet_dir, torch_dtype, check)
        fields["input_shape"] = tuple(input_shape) if input_shape else _input_shape(unet)
        if config_overrides:
            fields.update(config_overrides)
        if translation.ignored:
            listed = ", ".join(f"{k}={v!r:.80}" for k, v in sorted(translation.ignored.items()))
            warnings.warn(
                f"diffusers scheduler options not modelled by tinydiff, ignored: {listed}. "
                "tinydiff always samples down to t = 0 with alpha_bar = 1; samples can differ "
                "from diffusers' where these options matter "
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
        net = DiffusersUNet(unet, **translation.network)
        _check_time_map(config, net)
        model = cls(net, config)  # type: ignore[call-arg]
        return model.to(device)  # type: ignore[attr-defined,no-any-return]

    def to_diffusers(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write a folder that diffusers' `DDPMPipeline.from_pretrained` loads.

        Needs a network that wraps a diffusers model (`DiffusersUNet`, as built by
        `from_diffusers`). Writes model_index.json, unet/ (config.json and
        diffusion_pytorch_model.safetensors, the weights bit for bit) and
        scheduler/scheduler_config.json: a `DDPMScheduler` with this model's schedule,
        prediction type and variance type (see `scheduler_config_from_tinydiff`) for a
        discrete-VP model, `FlowMatchEulerDiscreteScheduler` (`FlowMatchHeun...` for the
        `heun` sampler) with its shift for `rectified_flow`, `EDMEulerScheduler`
        (`EDMDPMSolverMultistepScheduler` for `dpmpp_2m`) for `edm`.

        The folder is written as a unit (`tinydiff._atomic.FolderWriter`): diffusers
        saves into a scratch folder beside it, its files are then copied in and replace the
        previous ones together, with a manifest written last. Files tinydiff did not write
        are never deleted; a stale `unet/diffusion_pytorch_model.bin` is reported in a
        warning (diffusers loads the safetensors file when both exist).

        Args:
            save_directory: the folder (created if needed).

        Returns:
            the folder.

        Raises:
            TypeError: the network is not a diffusers model.
            UnsupportedSchedulerError: a process, target or variance type diffusers has no
                scheduler for.
            NotADirectoryError: `save_directory`, or its `unet`/`scheduler`, is a file.
            SerializationError: diffusers wrote no weights.
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
        class_name, options = _scheduler_for(model)
        folder = Path(save_directory)
        for path in (folder, folder / "unet", folder / "scheduler"):
            if os.path.lexists(path) and not path.is_dir():
                raise NotADirectoryError(
                    f"{path} exists and is not a folder; to_diffusers writes a folder there. "
                    "Move or delete it, or pick another save_directory"
                )
        scheduler = getattr(diffusers, class_name)(**options)
        pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_scratch(folder)
        scratch = Path(tempfile.mkdtemp(prefix=_scratch_prefix(folder), dir=folder.parent))
        try:
            pipeline.save_pretrained(str(scratch), safe_serialization=True)
            written = sorted(p for p in scratch.rglob("*") if p.is_file())
            names = {p.relative_to(scratch).as_posix() for p in written}
            if f"unet/{_WEIGHTS}" not in names and f"unet/{_WEIGHTS_INDEX}" not in names:
                raise SerializationError(
                    f"diffusers wrote no UNet weights (unet/{_WEIGHTS}) while saving to "
                    f"{folder}; nothing was changed there"
                )
            with FolderWriter(folder) as save:
                for path in written:
                    save.copy_file(path.relative_to(scratch).as_posix(), path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        stale = [folder / "unet" / n for n in _STALE if os.path.lexists(folder / "unet" / n)]
        if stale:
            warnings.warn(
                f"{', '.join(map(str, stale))} was not written by this save and is left in place "
                "(tinydiff never deletes files it did not write). diffusers loads the new "
                f"unet/{_WEIGHTS} (its use_safetensors default prefers safetensors), but "
                "use_safetensors=False or other tools would read the stale pickle: delete it",
                UserWarning,
                stacklevel=2,
            )
        return folder
