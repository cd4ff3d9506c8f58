"""Sampling defaults per process: the default sampler (config ``sampler_type=None``), each
sampler's default spacing on a process, the default number of steps, the FutureWarnings
where a call's meaning changed since 0.2, and the default against the best built-in spacing
on the exact flow of a Gaussian mixture."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import exact_model

from tinydiff import DiffusionModel, DiffusionModelConfig, samplers, spacings
from tinydiff.config import config_from_saved
from tinydiff.nn import MLP
from tinydiff.testing import GaussianMixture, probability_flow_reference

RF = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}
RF3 = {**RF, "schedule_kwargs": {"shift": 3.0}}
EDM = {"noise_schedule_type": "edm", "target_type": "edm"}
VP = {"noise_schedule_type": "cosine"}
#: two Gaussians at (-1.5, 0) and (1.5, 0.5), std 0.3 and 0.5
TWO = GaussianMixture([[-1.5, 0.0], [1.5, 0.5]], [0.3, 0.5])


def _net() -> MLP:
    return MLP(2, hidden_dim=8, num_layers=1, time_embed_dim=8)


def _config(**fields: Any) -> DiffusionModelConfig:
    return DiffusionModelConfig(input_shape=(2,), **fields)


def _future(fn: Any) -> list[str]:
    """Run fn, return the messages of the FutureWarnings it gave (every one, not once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


# -- the default sampler -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "ddpm"),
        ({"noise_schedule_type": "linear"}, "ddpm"),
        ({"noise_schedule_type": "cosine", "zero_terminal_snr": True}, "ddpm"),
        (RF, "unipc"),
        (RF3, "unipc"),
        (EDM, "unipc"),
    ],
)
def test_the_process_chooses_the_sampler_of_a_config_that_names_none(
    fields: dict[str, Any], expected: str
) -> None:
    cfg = _config(**fields)
    assert cfg.sampler_type is None
    assert cfg.sampler_name() == expected == samplers.default_sampler(cfg.process())
    model = DiffusionModel(_net(), cfg)
    assert f"sampler={expected}" in repr(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert type(model.make_sampler()) is samplers.get(expected)


@pytest.mark.parametrize("fields", [VP, RF, EDM])
def test_an_explicit_sampler_type_wins(fields: dict[str, Any]) -> None:
    for name in ("ddpm", "unipc", "heun"):
        cfg = _config(sampler_type=name, **fields)
        assert cfg.sampler_name() == name
    # options of the default sampler are checked against it
    with pytest.raises(ValueError, match="sampler_kwargs"):
        _config(sampler_kwargs={"no_such_option": 1}, **fields)


def test_configs_of_0_2_keep_ddpm() -> None:
    """0.2 wrote sampler_type='ddpm' out; a hand-edited 0.2 file without it gets 0.2's
    default, ddpm, too; a 0.3 file without it gets the process's default."""
    for fields in (RF, EDM, VP):
        written = {"input_shape": [2], "sampler_type": "ddpm", **fields}
        assert config_from_saved(written, "0.2.0").sampler_name() == "ddpm"
        left_out = {"input_shape": [2], **fields}
        assert config_from_saved(left_out, "0.2.0").sampler_type == "ddpm"
        assert config_from_saved(left_out, "0.3.0").sampler_type is None


@pytest.mark.parametrize("sampler_type", [None, "ddim"])
def test_save_and_load_keep_none_or_the_name(tmp_path: Path, sampler_type: str | None) -> None:
    model = DiffusionModel(_net(), _config(sampler_type=sampler_type, **RF))
    loaded = DiffusionModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config.sampler_type == sampler_type
    assert loaded.config == model.config


# -- the default spacing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (RF, "trailing"),  # lambda = 0 at t = T / 2
        ({**RF, "schedule_kwargs": {"shift": 1.9}}, "trailing"),  # T / 2.9
        ({**RF, "schedule_kwargs": {"shift": 2.1}}, "quadratic"),  # T / 3.1
        (RF3, "quadratic"),  # T / 4
        (EDM, "trailing"),  # sigma = 1 at s = 0.40
    ],
)
def test_the_default_spacing_of_a_path_follows_where_snr_crosses_one(
    fields: dict[str, Any], expected: str
) -> None:
    """quadratic where lambda(t) = 0 before T / 3, trailing after; on rectified flow with
    shift m, lambda = 0 at s' = 1/2, t = T / (1 + m)."""
    process = _config(**fields).process()
    t0 = float(process.time_at_lam(torch.tensor(0.0, dtype=torch.float64)))
    shift = fields.get("schedule_kwargs", {}).get("shift")
    if shift is not None:
        assert math.isclose(t0, 1000 / (1 + shift), rel_tol=1e-9)
    for name in samplers.names():
        cls = samplers.get(name)
        # few-step samplers (flow_map, consistency) keep their own spacing on every process
        want = expected if cls.few_step_default is None else cls.default_spacing
        assert cls.spacing_for(process) == want, name


def test_variance_preserving_processes_keep_each_samplers_default_spacing() -> None:
    for fields in (VP, {"noise_schedule_type": "linear"}):
        process = _config(**fields).process()
        for name in samplers.names():
            cls = samplers.get(name)
            assert cls.spacing_for(process) == cls.default_spacing


# -- the default number of steps -----------------------------------------------------------------
def test_no_step_count_is_50_deterministic_steps_or_all_stochastic_ones() -> None:
    model = DiffusionModel(_net(), _config(num_timesteps=80, **RF))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert model.sampling_timesteps(sampler="unipc").numel() == 51
        assert model.sampling_timesteps(sampler="ddpm").numel() == 81
        # explicit times keep their own count
        assert model.sampling_timesteps(None, [80.0, 40.0, 0.0], sampler="unipc").numel() == 3
    small = DiffusionModel(_net(), _config(num_timesteps=30, **RF))
    assert _future(lambda: small.sampling_timesteps(sampler="euler")) == []  # 30 = T
    assert small.sampling_timesteps(sampler="euler").numel() == 31


# -- the FutureWarnings --------------------------------------------------------------------------
def test_future_warnings_fire_exactly_where_a_call_changed_meaning() -> None:
    torch.manual_seed(0)
    rf = DiffusionModel(_net(), _config(**RF))
    # unset sampler on a path: the sampler changed (and unipc's spacing on this process)
    msgs = _future(lambda: rf.sample(2, 4))
    assert len(msgs) == 2
    assert "sampler_type='ddpm'" in msgs[0] and "'unipc'" in msgs[0]
    assert "timestep_spacing='quadratic'" in msgs[1] and "sampling_timesteps" not in msgs[1]
    # ... and with no step count, the count changed too: in the same second warning
    msgs = _future(lambda: rf.sample(2))
    assert len(msgs) == 2 and "sampling_timesteps=1000" in msgs[1]
    assert "timestep_spacing='quadratic'" in msgs[1]
    # named sampler and spacing, a count: no change
    assert _future(lambda: rf.sample(2, 4, sampler="unipc", timestep_spacing="trailing")) == []
    # 0.2's explicit ddpm on a path: unchanged, also with no step count (stochastic: T)
    old = DiffusionModel(_net(), _config(sampler_type="ddpm", num_timesteps=60, **RF))
    assert _future(lambda: old.sample(2)) == []
    # VP with the default sampler: nothing changed
    vp = DiffusionModel(_net(), _config(num_timesteps=60))
    assert _future(lambda: vp.sample(2)) == []
    assert _future(lambda: vp.sample(2, 5, sampler="dpmpp_2m")) == []
    # VP, a deterministic sampler without a count: 50 steps instead of T
    msgs = _future(lambda: vp.sample(2, sampler="ddim"))
    assert len(msgs) == 1 and "runs 50 steps" in msgs[0] and "timestep_spacing" not in msgs[0]
    # a path whose default spacing for a sampler is its 0.2 one: no spacing warning
    rf3 = DiffusionModel(_net(), _config(sampler_type="unipc", **RF3))
    assert _future(lambda: rf3.sample(2, 4)) == []


# -- the default against the best built-in spacing -----------------------------------------------
@pytest.mark.parametrize("fields", [VP, RF, RF3, EDM], ids=["vp", "rf1", "rf3", "edm"])
def test_the_default_is_within_1_25x_of_the_best_builtin_spacing(fields: dict[str, Any]) -> None:
    """One cell of benchmarks/defaults_grid.py: two Gaussians, 10 steps, exact denoiser, RMS
    error to the exact flow from the same x_T; the process's default sampler (on VP, whose
    default ddpm is stochastic, unipc with its VP default spacing) with no spacing against
    its best built-in spacing."""
    model = exact_model(TWO, **fields)
    name = "unipc" if model.process.variance_preserving else model.config.sampler_name()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = z * model.process.prior_std()
    if fields is EDM:
        ref = probability_flow_reference(
            TWO, z, start=(1.0, 80.0), end=(1.0, 0.002), num_steps=100, denoise_end=False
        )
    elif model.process.variance_preserving:
        ab = model.alphas_cumprod
        ref = probability_flow_reference(TWO, z, float(ab[-1]), float(ab[1]), num_steps=100)
    else:  # alpha(T) = 0: from sigma / alpha = 1e6 (z stands in for the state there)
        k = 1e6
        ref = probability_flow_reference(
            TWO, z, start=(1 / (1 + k), k / (1 + k)), end=(1 - 1e-5, 1e-5), num_steps=100
        )

    def error(spacing: str | None) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            x = model.sample(64, 10, sampler=name, init_noise=z, timestep_spacing=spacing)
        return float(((x - ref) ** 2).sum(1).mean().sqrt())

    best = min(error(sp) for sp in spacings.names())
    assert error(None) <= 1.25 * best
