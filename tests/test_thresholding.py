"""x0 clipping and dynamic thresholding (tinydiff.thresholding): the maps against their
definitions and diffusers' own code, the option parsing, the config fields, and (once
``DiffusionModel.sample`` takes ``clip_x0`` / ``dynamic_threshold``) tinydiff's ddpm and ddim
against diffusers' DDPMScheduler / DDIMScheduler loops with ``clip_sample`` and
``thresholding``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _nets import tiny_diffusers_unet

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.thresholding import (
    ClipX0,
    DynamicThreshold,
    parse_clip_x0,
    parse_dynamic_threshold,
    x0_limit,
)


# -- the maps ----------------------------------------------------------------------------------
def test_dynamic_threshold_follows_its_definition() -> None:
    """Per sample: s = clamp(quantile_p |x0|, 1, max_value); clamp to [-s, s], divide by s."""
    # sample 0: |x| = 0..9 -> the 0.5-quantile (linear interpolation) is 4.5, inside [1, 6]
    # sample 1: all |x| <= 0.5 -> s = 1: unchanged; sample 2: quantile 90 -> s = max_value 6
    x0 = torch.stack(
        [
            torch.arange(10.0) * torch.tensor([1.0, -1.0]).repeat(5),
            torch.linspace(-0.5, 0.5, 10),
            torch.full((10,), 90.0),
        ]
    ).reshape(3, 2, 5)
    out = DynamicThreshold(percentile=0.5, max_value=6.0)(x0)
    expected = torch.stack(
        [
            x0[0].clamp(-4.5, 4.5) / 4.5,
            x0[1],
            x0[2].clamp(-6.0, 6.0) / 6.0,
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert out.abs().max() <= 1.0  # always in [-1, 1]
    # max_value 1: plain clipping to [-1, 1]
    torch.testing.assert_close(DynamicThreshold(0.9, 1.0)(x0), x0.clamp(-1, 1), rtol=0, atol=0)


def test_dynamic_threshold_quantile_is_torch_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 7, 64, 1001):
        x = torch.randn(4, m, generator=gen, dtype=torch.float64) * 5
        for p in (0.1, 0.5, 0.9, 0.995, 1.0):
            s = torch.quantile(x.abs(), p, dim=1).clamp(1, 100)[:, None]
            expected = x.clamp(-s, s) / s
            torch.testing.assert_close(DynamicThreshold(p, 100.0)(x), expected, rtol=1e-12, atol=0)


def test_half_precision_is_thresholded_in_float32() -> None:
    x = (torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3).half()
    out = DynamicThreshold(0.8, 2.0)(x)
    assert out.dtype == torch.float16
    expected = DynamicThreshold(0.8, 2.0)(x.float()).half()
    assert torch.equal(out, expected)


def test_clip_is_an_elementwise_clamp() -> None:
    x = torch.linspace(-3, 3, 13).reshape(1, 13)
    assert torch.equal(ClipX0(-1.0, 2.0)(x), x.clamp(-1, 2))


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 1, 7), (2, 4, 2, 3, 3)])
@pytest.mark.parametrize(("ratio", "max_value"), [(0.995, 1.0), (0.9, 1.7), (0.6, 5.0)])
def test_dynamic_threshold_equals_diffusers(
    shape: tuple[int, ...], ratio: float, max_value: float
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2.5
    x[0] *= 0.1  # one sample entirely inside [-1, 1]: s = 1
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        scheduler = cls(
            thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value
        )
        expected = scheduler._threshold_sample(x.clone())
        torch.testing.assert_close(
            DynamicThreshold(ratio, max_value)(x), expected, rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("clip_range", [1.0, 0.5, 3.0])
def test_clip_equals_diffusers_clip_sample(clip_range: float) -> None:
    """diffusers' step clamps pred_original_sample to +-clip_sample_range: read it off step()
    with prediction_type='sample' (x0 is the model output), on the last step where the new
    sample is exactly the clipped x0 (alpha_prev = 1, no noise)."""
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 2
    scheduler = diffusers.DDIMScheduler(
        prediction_type="sample", clip_sample=True, clip_sample_range=clip_range
    )
    scheduler.set_timesteps(10)
    out = scheduler.step(x0, scheduler.timesteps[-1], torch.randn_like(x0))
    expected = out.pred_original_sample
    torch.testing.assert_close(parse_clip_x0(clip_range)(x0), expected, rtol=1e-6, atol=1e-6)


# -- parsing -----------------------------------------------------------------------------------
def test_parse_forms() -> None:
    assert parse_clip_x0(None) is None and parse_clip_x0(False) is None
    assert parse_clip_x0(1) == ClipX0(-1.0, 1.0) == parse_clip_x0((-1, 1))
    assert parse_clip_x0([-2, 0.5]) == ClipX0(-2.0, 0.5) == parse_clip_x0({"lo": -2, "hi": 0.5})
    assert parse_dynamic_threshold(None) is None and parse_dynamic_threshold(False) is None
    assert parse_dynamic_threshold(True) == DynamicThreshold(0.995, 1.0)
    assert parse_dynamic_threshold((0.9, 2)) == DynamicThreshold(0.9, 2.0)
    assert parse_dynamic_threshold({"max_value": 2}) == DynamicThreshold(0.995, 2.0)
    limit = DynamicThreshold(0.9, 1.5)
    assert parse_dynamic_threshold(limit) is limit


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, "clip_x0 must be None, a number c"),
        ("1", TypeError, "clip_x0 must be None"),
        (0, ValueError, "must be > 0"),
        (-1.0, ValueError, "must be > 0"),
        (float("nan"), ValueError, "finite"),
        ((1, -1), ValueError, "lo < hi"),
        ((0, 0), ValueError, "lo < hi"),
        ((-1, 0, 1), ValueError, "2 entries"),
        ((-1, float("inf")), ValueError, "finite"),
        ({"lo": -1}, ValueError, "keys 'lo' and 'hi'"),
        ((-1, "1"), TypeError, "real number"),
    ],
)
def test_bad_clip_x0_is_explained(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_clip_x0(value)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.995, TypeError, "dynamic_threshold must be None, True"),
        ("yes", TypeError, "dynamic_threshold must be None, True"),
        ((0.0, 1.0), ValueError, r"percentile must be in \(0, 1\]"),
        ((1.5, 1.0), ValueError, r"percentile must be in \(0, 1\]"),
        ((0.9, 0.0), ValueError, "max_value must be > 0"),
        ((0.9,), ValueError, "2 entries"),
        ({"ratio": 0.9}, ValueError, "unknown keys \\['ratio'\\]"),
    ],
)
def test_bad_dynamic_threshold_is_explained(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_dynamic_threshold(value)


def test_per_call_options_replace_the_default() -> None:
    default = ClipX0(-1.0, 1.0)
    assert x0_limit(default=default) is default
    assert x0_limit(clip_x0=False, default=default) is None  # off for this call
    assert x0_limit(dynamic_threshold=True, default=default) == DynamicThreshold()
    assert x0_limit(clip_x0=2, default=default) == ClipX0(-2.0, 2.0)
    with pytest.raises(ValueError, match="both set; choose one"):
        x0_limit(clip_x0=1, dynamic_threshold=True)


# -- the config fields ---------------------------------------------------------------------------
def test_config_fields_take_the_option_forms_and_round_trip() -> None:
    cfg = DiffusionModelConfig(input_shape=(2,), clip_x0=2)
    assert cfg.clip_x0 == (-2.0, 2.0) and cfg.x0_limit() == ClipX0(-2.0, 2.0)
    again = DiffusionModelConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    cfg = DiffusionModelConfig(input_shape=(2,), dynamic_threshold={"percentile": 0.9})
    assert cfg.dynamic_threshold == (0.9, 1.0) and cfg.x0_limit() == DynamicThreshold(0.9, 1.0)
    assert DiffusionModelConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    bare = DiffusionModelConfig(input_shape=(2,))
    assert bare.clip_x0 is None and bare.dynamic_threshold is None and bare.x0_limit() is None


def test_config_refuses_bad_or_double_limits() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        DiffusionModelConfig(input_shape=(2,), clip_x0=(1, -1))
    with pytest.raises(ValueError, match="clip_x0 must be None, a number c"):
        DiffusionModelConfig(input_shape=(2,), clip_x0="1")
    with pytest.raises(ValueError, match="percentile must be in"):
        DiffusionModelConfig(input_shape=(2,), dynamic_threshold=(2, 1))
    with pytest.raises(ValueError, match="both set; choose one"):
        DiffusionModelConfig(input_shape=(2,), clip_x0=1, dynamic_threshold=True)


# -- against diffusers' loops (once sample() takes the options) ----------------------------------
_WIRED = "clip_x0" in inspect.signature(DiffusionModel.sample).parameters
needs_sample_option = pytest.mark.skipif(
    not _WIRED,
    reason="DiffusionModel.sample does not take clip_x0 / dynamic_threshold yet (the denoiser "
    "wiring of tinydiff.thresholding lands with the core restructuring)",
)
STEPS = 10
LIMITS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (diffusers scheduler options, tinydiff sample() options)
    "clip": ({"clip_sample": True}, {"clip_x0": (-1.0, 1.0)}),
    "clip_range": ({"clip_sample": True, "clip_sample_range": 0.5}, {"clip_x0": 0.5}),
    "threshold": ({"thresholding": True}, {"dynamic_threshold": True}),
    "threshold_wide": (
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"dynamic_threshold": (0.9, 1.5)},
    ),
}


def _unet() -> Any:
    return tiny_diffusers_unet()


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unet")
    _unet().save_pretrained(folder, safe_serialization=True)
    return folder


def _diffusers_loop(scheduler: Any, unet: Any, x_t: torch.Tensor, seed: int) -> torch.Tensor:
    """diffusers' sampling loop from x_T; DDPM's per-step noise from a generator seeded like
    tinydiff's (both draw randn of x's shape once per step, in the same order)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(STEPS)
    sample = x_t * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(sample, k), k).sample
            if isinstance(scheduler, diffusers.DDPMScheduler):
                sample = scheduler.step(out, k, sample, generator=generator).prev_sample
            else:
                sample = scheduler.step(out, k, sample).prev_sample
    return sample


def _float64_tables(scheduler: Any) -> Any:
    """diffusers' linear-beta alpha_bar table recomputed in float64: its own float32 cumprod
    is off by up to 2e-5 relative near alpha_bar_T = 4e-5 (test_diffusers_compat), which a
    1e-5 comparison of clipped samples (of magnitude 1) would measure instead of the limit."""
    cfg = scheduler.config
    betas = torch.linspace(
        cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64
    )
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    return scheduler


CASES = [
    ("DDPMScheduler", "epsilon", "clip"),
    ("DDPMScheduler", "epsilon", "threshold_wide"),
    ("DDIMScheduler", "epsilon", "clip"),
    ("DDIMScheduler", "epsilon", "threshold"),
    ("DDIMScheduler", "epsilon", "threshold_wide"),
    # a v_prediction UNet's x0 estimates stay near [-1, 1]: the 0.5 range is active there
    ("DDIMScheduler", "v_prediction", "clip_range"),
]


@needs_sample_option
@pytest.mark.parametrize(("scheduler_name", "prediction", "limit"), CASES)
def test_samplers_with_a_limit_equal_diffusers_loops(
    unet_dir: Path, tmp_path: Path, scheduler_name: str, prediction: str, limit: str
) -> None:
    """Same network, same x_T (and for DDPM the same per-step noise): tinydiff's ddpm / ddim
    with clip_x0 / dynamic_threshold equal diffusers' loops with clip_sample / thresholding
    to 1e-5 relative."""
    theirs, ours = LIMITS[limit]
    cls = getattr(diffusers, scheduler_name)
    base = {"prediction_type": prediction, "timestep_spacing": "trailing"}
    # the tinydiff model is imported without a limit; the limit is given per sample() call
    cls(**base, clip_sample=False).save_config(tmp_path)
    model = DiffusionModel.from_diffusers(unet_dir, scheduler_config=tmp_path)
    scheduler = _float64_tables(cls(**base, **theirs))
    x_t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _diffusers_loop(scheduler, model.nn_module.unet, x_t, seed=7)
    free = _diffusers_loop(
        _float64_tables(cls(**base, clip_sample=False)), model.nn_module.unet, x_t, 7
    )
    assert float((expected - free).abs().max()) > 0.1  # the limit is active
    sampler = "ddpm" if scheduler_name == "DDPMScheduler" else "ddim"
    got = model.sample(
        2,
        STEPS,
        sampler=sampler,
        init_noise=x_t,
        generator=torch.Generator().manual_seed(7),
        **ours,
    )
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < 1e-5, rel
    # the same limit set in the config instead of the call
    config = DiffusionModelConfig.model_validate({**model.config.model_dump(), **ours})
    configured = DiffusionModel(model.nn_module, config)
    again = configured.sample(
        2, STEPS, sampler=sampler, init_noise=x_t, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(again, got)


def test_from_diffusers_maps_clip_and_thresholding(unet_dir: Path, tmp_path: Path) -> None:
    """clip_sample / clip_sample_range / thresholding / dynamic_thresholding_ratio /
    sample_max_value become clip_x0 / dynamic_threshold, and to_diffusers writes them back."""
    cases = [
        ({"clip_sample": True, "clip_sample_range": 2.0}, {"clip_x0": (-2.0, 2.0)}),
        ({"clip_sample": False}, {"clip_x0": None, "dynamic_threshold": None}),
        (
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
            {"dynamic_threshold": (0.9, 1.5), "clip_x0": None},
        ),
    ]
    for i, (options, fields) in enumerate(cases):
        scheduler = diffusers.DDPMScheduler(**options)
        model = DiffusionModel.from_diffusers(unet_dir, scheduler_config=dict(scheduler.config))
        for key, value in fields.items():
            assert getattr(model.config, key) == value, (options, key)
        out = model.to_diffusers(tmp_path / f"case{i}")
        written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        for key, value in options.items():
            assert written[key] == value, (options, key)
