"""diffusers checkpoints in and out: tinydiff's samplers on a diffusers UNet agree with
diffusers' own scheduler loops, and to_diffusers writes a folder DDPMPipeline loads bitwise.

Everything is built here (a tiny randomly initialised UNet2DModel saved into tmp_path); no
weights are downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tinydiff import DiffusionModel, DiffusionModelConfig  # noqa: E402
from tinydiff.diffusers_compat import (  # noqa: E402
    DiffusersUNet,
    UnsupportedSchedulerError,
    translate_scheduler_config,
)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}
STEPS = 10
RTOL = 1e-5


def _unet(out_channels: int = 2) -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unet")
    _unet().save_pretrained(folder, safe_serialization=True)
    return folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def _diffusers_loop(scheduler: Any, unet: Any, x_t: torch.Tensor) -> torch.Tensor:
    """diffusers' standard sampling loop, started from the VP sample x_T."""
    scheduler.set_timesteps(STEPS)
    if isinstance(scheduler, diffusers.EulerDiscreteScheduler):
        # Euler works in x / alpha; for "trailing" and "linspace" its init_noise_sigma is
        # sigma_max rather than sqrt(1 + sigma_max^2), i.e. a pipeline would start from a
        # slightly shrunk x_T. Start from the same x_T as tinydiff instead.
        sample = x_t * float((scheduler.sigmas[0].double() ** 2 + 1).sqrt())
    else:
        sample = x_t * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(sample, k), k).sample
            sample = scheduler.step(out, k, sample).prev_sample
    return sample


@pytest.mark.parametrize("betas", sorted(BETAS))
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_samplers_agree_with_diffusers_schedulers(
    unet_dir: Path, tmp_path: Path, sampler: str, prediction: str, betas: str
) -> None:
    cls = getattr(diffusers, SCHEDULERS[sampler])
    options: dict[str, Any] = {"prediction_type": prediction, "timestep_spacing": "trailing"}
    options.update(BETAS[betas])
    if sampler == "ddim":
        options["clip_sample"] = False
    scheduler = cls(**options)
    scheduler.save_config(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = DiffusionModel.from_diffusers(unet_dir, scheduler_config=tmp_path)
    # every option of these configs is translated: no "not modelled" warning
    assert not [w for w in caught if "not modelled" in str(w.message)]
    assert model.config.sampler_type == sampler
    x_t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _diffusers_loop(scheduler, model.nn_module.unet, x_t)
    # the same times, once through the translated default spacing, once explicitly (k + 1)
    got = model.sample(2, STEPS, init_noise=x_t)
    times = [float(k) + 1 for k in scheduler.timesteps] + [0.0]
    got_explicit = model.sample(2, init_noise=x_t, timestep_spacing=times)
    assert torch.equal(got, got_explicit)
    assert _rel(got, expected) < RTOL


def test_tables_match_diffusers_to_float32(unet_dir: Path) -> None:
    for kind, options in [
        *BETAS.items(),
        ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
    ]:
        for num in (1000, 250):
            sched = diffusers.DDPMScheduler(num_train_timesteps=num, **options)
            translated = translate_scheduler_config(dict(sched.config)).config
            ab = DiffusionModelConfig(input_shape=(2,), **translated).alphas_cumprod()
            assert ab[0] == 1.0 and ab.numel() == num + 1, kind
            # diffusers' alphas_cumprod[k] is tinydiff's alpha_bar at t = k + 1
            rel = ((sched.alphas_cumprod.double() - ab[1:]).abs() / ab[1:]).max()
            assert rel < 2e-5, (kind, num, float(rel))


def test_trained_betas_and_unequal_num_timesteps(unet_dir: Path, tmp_path: Path) -> None:
    betas = torch.linspace(1e-3, 0.1, 100, dtype=torch.float64)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=100,
        trained_betas=betas.tolist(),
        clip_sample=False,
        timestep_spacing="trailing",
    )
    scheduler.save_config(tmp_path)
    model = DiffusionModel.from_diffusers(unet_dir, scheduler_config=tmp_path)
    assert model.config.noise_schedule_type == "betas"
    torch.testing.assert_close(
        1 - model.alphas_cumprod[1:] / model.alphas_cumprod[:-1], betas, rtol=1e-12, atol=0
    )
    x_t = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = _diffusers_loop(scheduler, model.nn_module.unet, x_t)
    assert _rel(model.sample(1, STEPS, init_noise=x_t), expected) < RTOL


def test_network_wrapper_converts_time_and_unwraps(unet_dir: Path) -> None:
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir)
    net = DiffusersUNet(unet)
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([1.0, 500.0, 1000.0])
    with torch.no_grad():
        assert torch.equal(net(x, t), unet(x, t - 1).sample)


def test_pipeline_folder_round_trip_is_bitwise(tmp_path: Path) -> None:
    unet = _unet(out_channels=4)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=200,
        beta_schedule="scaled_linear",
        variance_type="learned_range",
        prediction_type="v_prediction",
        clip_sample=False,
    )
    src = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(src)
    model = DiffusionModel.from_diffusers(src)
    cfg = model.config
    assert (cfg.num_timesteps, cfg.target_type, cfg.variance_type) == (
        200,
        "pred_v",
        "learned_range",
    )
    assert cfg.input_shape == (2, 8, 8) and cfg.sampler_type == "ddpm"
    out = model.to_diffusers(tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    ours = model.nn_module.unet.state_dict()
    theirs = pipe.unet.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    torch.testing.assert_close(
        pipe.scheduler.alphas_cumprod, scheduler.alphas_cumprod, rtol=0, atol=0
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.variance_type == "learned_range"
    # and back again: the same tinydiff config
    assert DiffusionModel.from_diffusers(out).config == cfg
    # diffusers runs its own pipeline on the written folder
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 8, 8, 2)


def test_to_diffusers_writes_any_schedule_as_betas(unet_dir: Path, tmp_path: Path) -> None:
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir)
    model = DiffusionModel(
        DiffusersUNet(unet),
        {"input_shape": (2, 8, 8), "num_timesteps": 64, "noise_schedule_type": "sigmoid"},
    )
    pipe = diffusers.DDPMPipeline.from_pretrained(model.to_diffusers(tmp_path))
    rel = (
        pipe.scheduler.alphas_cumprod.double() - model.alphas_cumprod[1:]
    ).abs() / model.alphas_cumprod[1:]
    assert rel.max() < 1e-4  # diffusers' float32 cumprod, down to alpha_bar_T ~ 5e-5
    assert pipe.scheduler.config.variance_type == "fixed_large"  # tinydiff's upper_bound


def test_unmodelled_options_are_named_in_a_warning(unet_dir: Path) -> None:
    options = dict(
        diffusers.DDIMScheduler(clip_sample=True, thresholding=True, set_alpha_to_one=False).config
    )
    with pytest.warns(
        UserWarning, match="clip_sample=True.*set_alpha_to_one=False.*thresholding=True"
    ):
        DiffusionModel.from_diffusers(unet_dir, scheduler_config=options)
    karras = dict(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config)
    assert translate_scheduler_config(karras).config["timestep_spacing"] == "karras"
    zero = dict(
        diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    )
    assert translate_scheduler_config(zero).config["zero_terminal_snr"] is True
    lms = translate_scheduler_config({"_class_name": "LMSDiscreteScheduler"})
    assert "sampler_type" not in lms.config and lms.ignored == {
        "_class_name": "LMSDiscreteScheduler"
    }


def test_unsupported_inputs_say_what_to_do(unet_dir: Path, tmp_path: Path) -> None:
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    with pytest.raises(UnsupportedSchedulerError, match="not supported yet"):
        DiffusionModel.from_diffusers(unet_dir, scheduler_config=flow)
    with pytest.raises(UnsupportedSchedulerError, match="prediction_type='flow_prediction'"):
        translate_scheduler_config({"prediction_type": "flow_prediction"})
    with pytest.raises(UnsupportedSchedulerError, match="beta_schedule='exp'"):
        translate_scheduler_config({"beta_schedule": "exp"})
    with pytest.raises(UnsupportedSchedulerError, match="zero"):  # pred_eps at zero SNR
        DiffusionModel.from_diffusers(
            unet_dir,
            scheduler_config={"rescale_betas_zero_snr": True, "prediction_type": "epsilon"},
        )
    with pytest.raises(FileNotFoundError, match="scheduler_config"):
        DiffusionModel.from_diffusers(unet_dir)  # a bare UNet folder without a scheduler
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((unet_dir / "config.json").read_text())
    (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DiffusionModel.from_diffusers(bin_only, scheduler_config={})
    plain = DiffusionModel(torch.nn.Conv2d(2, 2, 1), {"input_shape": (2, 8, 8)})
    with pytest.raises(TypeError, match="diffusers model"):
        plain.to_diffusers(tmp_path / "nope")
    assert json.loads((unet_dir / "config.json").read_text())["_class_name"] == "UNet2DModel"
