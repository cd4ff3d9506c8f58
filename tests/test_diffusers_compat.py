"""diffusers checkpoints in and out: tinydiff's samplers on a diffusers UNet agree with
diffusers' own scheduler loops, and to_diffusers writes a folder DDPMPipeline loads bitwise.

Everything is built here (a tiny randomly initialised UNet2DModel saved into tmp_path); no
weights are downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from _nets import tiny_diffusers_unet  # noqa: E402

from tinydiff import DiffusionModel, DiffusionModelConfig  # noqa: E402
from tinydiff.diffusers_compat import (  # noqa: E402
    REFUSED,
    SAME_PROCESS_OTHER_SAMPLER,
    SCHEDULERS,
    DiffusersUNet,
    UnsupportedSchedulerError,
    translate_scheduler_config,
)
from tinydiff.hub import SerializationError  # noqa: E402

SAMPLER_SCHEDULERS = {
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
    return tiny_diffusers_unet(out_channels=out_channels)


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
@pytest.mark.parametrize("sampler", sorted(SAMPLER_SCHEDULERS))
def test_samplers_agree_with_diffusers_schedulers(
    unet_dir: Path, tmp_path: Path, sampler: str, prediction: str, betas: str
) -> None:
    cls = getattr(diffusers, SAMPLER_SCHEDULERS[sampler])
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
    with pytest.warns(UserWarning, match="set_alpha_to_one=False") as record:
        model = DiffusionModel.from_diffusers(unet_dir, scheduler_config=options)
    # clip_sample and thresholding are modelled (x0 limits): thresholding wins, as in diffusers
    assert not any("clip_sample" in str(w.message) for w in record)
    assert model.config.dynamic_threshold == (0.995, 1.0) and model.config.clip_x0 is None
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


# -- flow matching and EDM -----------------------------------------------------------------------

FLOW_STEPS = 6


def _pipeline(folder: Path, scheduler: Any) -> Path:
    diffusers.DDPMPipeline(unet=_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def _load_quietly(folder: Path, **kwargs: Any) -> DiffusionModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every option is translated: no warning
        return DiffusionModel.from_diffusers(folder, **kwargs)


def _flow_loop(scheduler: Any, unet: Any, x_t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """diffusers' FlowMatch loop: the UNet at timestep 1000 sigma, x += (sigma' - sigma) v."""
    scheduler.set_timesteps(FLOW_STEPS, **kwargs)
    sample = x_t.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = unet(sample, k).sample
            sample = scheduler.step(out, k, sample).prev_sample
    return sample


def _flow_times(scheduler: Any, shift: float) -> torch.Tensor:
    """diffusers' sigmas as tinydiff times: invert sigma = m s / (1 + (m - 1) s), t = T s."""
    sig = scheduler.sigmas.double()
    return scheduler.config.num_train_timesteps * sig / (shift - (shift - 1) * sig)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_pipeline_samples_like_diffusers(tmp_path: Path, shift: float) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    model = _load_quietly(_pipeline(tmp_path / "pipe", scheduler))
    cfg = model.config
    assert (cfg.noise_schedule_type, cfg.target_type, cfg.sampler_type) == (
        "rectified_flow",
        "pred_velocity",
        "euler",
    )
    assert cfg.schedule_kwargs == {"shift": shift} and cfg.num_timesteps == 1000
    x_t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    unet = model.nn_module.unet
    expected = _flow_loop(scheduler, unet, x_t)
    times = _flow_times(scheduler, shift)
    got = model.sample(2, sampler="euler", init_noise=x_t, timestep_spacing=times)
    assert _rel(got, expected) < RTOL
    # the other deterministic samplers run on it, on the translated default spacing
    for name in ("heun", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"):
        x = model.sample(2, 4, sampler=name, init_noise=x_t)
        assert x.shape == x_t.shape and bool(x.isfinite().all()), name
    # and back: equal weights, the same scheduler, an equal diffusers loop
    out = model.to_diffusers(tmp_path / "out")
    unet2 = diffusers.UNet2DModel.from_pretrained(out / "unet")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, unet2.state_dict()[key]), key
    scheduler2 = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert torch.equal(_flow_loop(scheduler2, unet2, x_t), expected)
    assert _load_quietly(out).config == cfg
    # an override that changes the process would break the time map: refused
    with pytest.raises(UnsupportedSchedulerError, match="'flow' time map"):
        DiffusionModel.from_diffusers(out, config_overrides={"schedule_kwargs": {"shift": 2.0}})


def test_flow_match_dynamic_shifting_needs_mu(tmp_path: Path) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    folder = _pipeline(tmp_path / "pipe", scheduler)
    with pytest.raises(UnsupportedSchedulerError, match=r"use_dynamic_shifting=True.*mu=\.\.\."):
        DiffusionModel.from_diffusers(folder)
    mu = 0.8
    model = _load_quietly(folder, mu=mu)
    assert model.config.schedule_kwargs["shift"] == pytest.approx(math.exp(mu), rel=1e-15)
    x_t = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = _flow_loop(scheduler, model.nn_module.unet, x_t, mu=mu)
    times = _flow_times(scheduler, math.exp(mu))
    got = model.sample(1, sampler="euler", init_noise=x_t, timestep_spacing=times)
    assert _rel(got, expected) < RTOL
    with pytest.raises(ValueError, match="mu is only used with use_dynamic_shifting"):
        translate_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, mu=1.0)
    linear = {**dict(scheduler.config), "time_shift_type": "linear"}
    assert translate_scheduler_config(linear, mu=2.5).config["schedule_kwargs"] == {"shift": 2.5}


def test_flow_wrapper_converts_time_and_velocity(unet_dir: Path) -> None:
    """DiffusersUNet's flow map: the UNet at 1000 sigma(s), its output (d x / d sigma) times
    d sigma / ds, against the closed form of the shifted path."""
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir)
    m = 3.0
    net = DiffusersUNet(unet, time_map="flow", shift=m, num_timesteps=1000)
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([1000.0, 500.0, 10.0])
    s = t.double() / 1000
    sigma = m * s / (1 + (m - 1) * s)
    with torch.no_grad():
        got = net(x, t)
        raw = unet(x, (1000 * sigma).float()).sample
    dsigma_ds = (m / (1 + (m - 1) * s) ** 2).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(got, raw * dsigma_ds, rtol=1e-6, atol=0)
    assert net.time_options == {
        "time_map": "flow",
        "shift": 3.0,
        "num_timesteps": 1000,
        "output_sign": 1,
    }


def _edm_loop(scheduler: Any, unet: Any, x_t: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' EDM loop: the UNet on c_in x at c_noise = ln(sigma) / 4."""
    scheduler.set_timesteps(steps)
    sample = x_t.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(sample, k), k).sample
            sample = scheduler.step(out, k, sample).prev_sample
    return sample


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_euler_pipeline_samples_like_diffusers(tmp_path: Path, prediction: str) -> None:
    # final_sigmas_type="sigma_min": diffusers' path ends at sigma_min, like tinydiff's edm
    scheduler = diffusers.EDMEulerScheduler(
        sigma_max=20.0, prediction_type=prediction, final_sigmas_type="sigma_min"
    )
    model = _load_quietly(_pipeline(tmp_path / "pipe", scheduler))
    cfg = model.config
    assert (cfg.noise_schedule_type, cfg.target_type, cfg.sampler_type) == ("edm", "edm", "euler")
    assert cfg.target_kwargs == {"sigma_data": 0.5}
    assert model.process.prior_std() == pytest.approx(scheduler.init_noise_sigma, rel=1e-12)
    x_t = scheduler.init_noise_sigma * torch.randn(
        2, 2, 8, 8, generator=torch.Generator().manual_seed(5)
    )
    unet = model.nn_module.unet
    # diffusers' N levels (Karras et al. eq. 5, then sigma_min again: a zero step) are
    # tinydiff's N - 1 steps of the translated "trailing" spacing
    expected = _edm_loop(scheduler, unet, x_t, FLOW_STEPS + 1)
    got = model.sample(2, FLOW_STEPS, init_noise=x_t)
    assert _rel(got, expected) < RTOL
    for name in ("heun", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"):
        x = model.sample(2, 4, sampler=name, init_noise=x_t)
        assert x.shape == x_t.shape and bool(x.isfinite().all()), name
    out = model.to_diffusers(tmp_path / "out")
    unet2 = diffusers.UNet2DModel.from_pretrained(out / "unet")
    for key, value in unet.state_dict().items():
        assert torch.equal(value, unet2.state_dict()[key]), key
    scheduler2 = diffusers.EDMEulerScheduler.from_pretrained(out / "scheduler")
    assert torch.equal(_edm_loop(scheduler2, unet2, x_t, FLOW_STEPS + 1), expected)
    assert _load_quietly(out).config == cfg


def test_edm_dpm_solver_is_translated(tmp_path: Path) -> None:
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    options = {**scheduler.config, "_class_name": "EDMDPMSolverMultistepScheduler"}
    translated = translate_scheduler_config(options)
    assert translated.config["sampler_type"] == "dpmpp_2m" and not translated.ignored
    assert translated.network == {"time_map": "edm", "output_sign": 1}


DIFFUSERS_SCHEDULERS = sorted(
    name
    for name in dir(diffusers)
    if name.endswith("Scheduler")
    and isinstance(getattr(diffusers, name), type)
    and issubclass(getattr(diffusers, name), diffusers.SchedulerMixin)
)


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_every_diffusers_scheduler_is_mapped_or_refused_with_a_reason(name: str) -> None:
    known = set(SCHEDULERS) | set(SAME_PROCESS_OTHER_SAMPLER) | set(REFUSED)
    assert name in known, f"diffusers' {name} is neither mapped nor refused"
    if name in REFUSED:
        with pytest.raises(UnsupportedSchedulerError, match=name) as err:
            translate_scheduler_config({"_class_name": name})
        assert "not supported yet" not in str(err.value)
        return
    options = {**getattr(diffusers, name)().config, "_class_name": name}
    if name.startswith("FlowMatch"):
        options.pop("use_dynamic_shifting", None)
    translated = translate_scheduler_config(options)
    if name in SAME_PROCESS_OTHER_SAMPLER:
        assert translated.ignored["_class_name"] == name
    DiffusionModelConfig(input_shape=(2,), **translated.config)


# -- bounded loading ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train_timesteps", "abc"),
        ("num_train_timesteps", None),
        ("num_train_timesteps", float("nan")),
        ("num_train_timesteps", 1.5),
        ("num_train_timesteps", True),
        ("num_train_timesteps", 0),
        ("trained_betas", "abc"),
        ("prediction_type", ["epsilon"]),
        ("beta_start", "0.1"),
        ("rescale_betas_zero_snr", 1),
        ("timestep_spacing", 3),
        ("_class_name", ["DDIMScheduler"]),
    ],
)
def test_malformed_scheduler_fields_are_named(field: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        translate_scheduler_config({field: value})


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        ("FlowMatchEulerDiscreteScheduler", "shift", -1.0),
        ("FlowMatchEulerDiscreteScheduler", "shift", "3"),
        ("FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", "yes"),
        ("EDMEulerScheduler", "sigma_data", 0),
        ("EDMEulerScheduler", "sigma_max", None),
        ("EDMEulerScheduler", "rho", float("inf")),
    ],
)
def test_malformed_flow_and_edm_fields_are_named(cls: str, field: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=field):
        translate_scheduler_config({"_class_name": cls, field: value})


def test_unet_is_checked_on_the_meta_device_before_allocation(
    unet_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """block_out_channels=[8, 12000] with a tiny weights file: refused from the header, and
    the UNet was only ever built on the meta device (diffusers would allocate ~5 GB)."""
    import tinydiff.diffusers_compat as compat

    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((unet_dir / "config.json").read_text())
    config["block_out_channels"] = [8, 12000]
    (big / "config.json").write_text(json.dumps(config))
    (big / "diffusion_pytorch_model.safetensors").write_bytes(
        (unet_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    devices: list[str] = []
    build = compat.build_diffusers_model

    def spy(config: Any, *, device: Any = "cpu", where: str = "") -> Any:
        devices.append(str(device))
        return build(config, device=device, where=where)

    monkeypatch.setattr(compat, "build_diffusers_model", spy)
    with pytest.raises(SerializationError, match="shape"):
        DiffusionModel.from_diffusers(big, scheduler_config={})
    assert devices == ["meta"]
    config["block_out_channels"] = [8, 2**40]
    (big / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="block_out_channels"):
        DiffusionModel.from_diffusers(big, scheduler_config={})


def test_config_files_are_bounded_regular_files(unet_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SerializationError, match="FIFO"):
        DiffusionModel.from_diffusers(unet_dir, scheduler_config=fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(SerializationError, match="character device"):
            DiffusionModel.from_diffusers(unet_dir, scheduler_config="/dev/zero")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SerializationError, match="nested too deeply"):
        DiffusionModel.from_diffusers(unet_dir, scheduler_config=deep)
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((unet_dir / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "sample_size": [8, 8, 8]}))
    (odd / "diffusion_pytorch_model.safetensors").write_bytes(
        (unet_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="sample_size"):
        DiffusionModel.from_diffusers(odd, scheduler_config={})


# -- writing ------------------------------------------------------------------------------------


def test_to_diffusers_is_folder_atomic_and_never_silent(
    unet_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = DiffusionModel.from_diffusers(unet_dir, scheduler_config={})
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(NotADirectoryError, match="afile"):
        model.to_diffusers(afile)
    assert afile.read_text() == "mine"
    out = tmp_path / "out"
    out.mkdir()
    (out / "unet").write_text("a file where the unet folder goes")
    with pytest.raises(NotADirectoryError, match="unet"):
        model.to_diffusers(out)
    assert sorted(p.name for p in out.iterdir()) == ["unet"]
    (out / "unet").unlink()
    # a foreign file and a stale pickle beside the new safetensors: kept, and warned about
    (out / "notes.txt").write_text("not tinydiff's")
    (out / "unet").mkdir()
    (out / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="diffusion_pytorch_model.bin.*safetensors"):
        model.to_diffusers(out)
    assert (out / "notes.txt").read_text() == "not tinydiff's"
    assert (out / "unet" / "diffusion_pytorch_model.bin").read_bytes() == b"stale"
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    for key, value in model.nn_module.unet.state_dict().items():
        assert torch.equal(value, pipe.unet.state_dict()[key]), key
    # diffusers writing no weights is an error, and the folder keeps the previous save
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(diffusers.DDPMPipeline, "save_pretrained", lambda self, *a, **k: None)
    with pytest.raises(SerializationError, match="no UNet weights"):
        model.to_diffusers(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if "scratch" in p.name]
    # the scratch folder of a killed to_diffusers is removed by the next one; a live one stays
    from tinydiff.diffusers_compat import _scratch_prefix

    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / (_scratch_prefix(out, dead.pid) + "x")
    live = tmp_path / (_scratch_prefix(out) + "y")
    for path in (left, live):
        (path / "unet").mkdir(parents=True)
    with pytest.warns(UserWarning, match="diffusion_pytorch_model.bin"):  # still there
        model.to_diffusers(out)
    assert not left.exists() and live.exists()


class _Crash(BaseException):
    """An interruption between two renames (what a crash leaves on disk, minus temporaries)."""


def test_to_diffusers_interrupted_at_every_rename_loads_old_new_or_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interruption after each os.replace of to_diffusers over a previous save: from_diffusers
    then loads exactly the old weights, exactly the new ones, or raises MixedSaveError."""
    import tinydiff._atomic as atomic
    from tinydiff._atomic import MixedSaveError

    def model(seed: int) -> DiffusionModel:
        unet = _unet()
        with torch.no_grad():
            unet.conv_in.weight.add_(seed)
        return DiffusionModel(DiffusersUNet(unet), {"input_shape": (2, 8, 8)})

    old, new = model(1), model(2)
    weight = "conv_in.weight"
    versions = {
        "old": old.nn_module.unet.state_dict()[weight],
        "new": new.nn_module.unet.state_dict()[weight],
    }
    real_replace = os.replace
    outcomes = []
    for n in range(8):
        out = tmp_path / f"out{n}"
        old.to_diffusers(out)
        calls = [0]

        def replace(src: Any, dst: Any, calls: list[int] = calls, n: int = n) -> None:
            if calls[0] == n:
                raise _Crash
            calls[0] += 1
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
        try:
            new.to_diffusers(out)
        except _Crash:
            pass
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        try:
            loaded = DiffusionModel.from_diffusers(out).nn_module.unet.state_dict()[weight]
        except MixedSaveError:
            outcomes.append("refused")
            continue
        outcomes.append(next(k for k, v in versions.items() if torch.equal(loaded, v)))
    assert set(outcomes) <= {"old", "new", "refused"} and outcomes[0] == "old", outcomes
    assert outcomes[-1] == "new" and "refused" in outcomes, outcomes
