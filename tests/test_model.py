"""DiffusionModel: config handling, the training loss, sampling API, and errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _nets import TinyConvNet, TinyNet
from pydantic import ValidationError

import tinydiff
from tinydiff import DiffusionModel, DiffusionModelConfig


def make(**kw) -> DiffusionModel:
    out_mult = 2 if kw.get("sigma_type") == "learned_range" else 1
    return DiffusionModel(TinyNet(2, out_mult), DiffusionModelConfig(input_shape=(2,), **kw))


# -- config ----------------------------------------------------------------------------------
def test_seed_library_config_is_accepted_as_written() -> None:
    cfg = DiffusionModelConfig(
        target_type="pred_x_0",
        sigma_type="upper_bound",
        noise_schedule_type="cosine",
        loss_type="l2",
        input_shape=(1, 32, 32),
    )
    model = DiffusionModel(TinyConvNet(1), cfg)
    assert model.loss(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_config_json_round_trip_frozen_and_strict() -> None:
    cfg = DiffusionModelConfig(
        input_shape=(3, 8, 8),
        num_timesteps=500,
        noise_schedule_type="linear",
        schedule_kwargs={"beta_end": 0.01},
        loss_type="huber",
        loss_kwargs={"delta": 0.5},
        min_snr_gamma=5.0,
        sampler_type="ddim",
        sampler_kwargs={"eta": 0.5},
        target_type="v",
    )
    assert cfg.target_type == "pred_v"  # aliases are stored under the canonical name
    again = DiffusionModelConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg and json.loads(cfg.model_dump_json())["input_shape"] == [3, 8, 8]
    with pytest.raises(ValidationError):
        cfg.num_timesteps = 10  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DiffusionModelConfig(input_shape=(2,), beta_schedule="linear")


def test_config_may_be_a_dict() -> None:
    model = DiffusionModel(TinyNet(), {"input_shape": [2], "num_timesteps": 10})
    assert model.config.input_shape == (2,) and model.alphas_cumprod.shape == (11,)
    with pytest.raises(TypeError, match="DiffusionModelConfig or a dict"):
        DiffusionModel(TinyNet(), "cosine")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        DiffusionModel(lambda x, t: x, {"input_shape": [2]})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_shape": ()},
        {"input_shape": (0, 3)},
        {"input_shape": (2,), "num_timesteps": 0},
        {"input_shape": (2,), "min_snr_gamma": -1.0},
        # pred_eps is ill-posed at SNR 0
        {"input_shape": (2,), "zero_terminal_snr": True, "target_type": "pred_eps"},
        {
            "input_shape": (2,),
            "zero_terminal_snr": True,
            "target_type": "pred_v",
            "num_timesteps": 1,
        },
        {"input_shape": (2,), "sampler_kwargs": {"etaa": 0.0}, "sampler_type": "ddim"},
        {"input_shape": (2,), "sampler_kwargs": {"eta": -1.0}, "sampler_type": "ddim"},
        {"input_shape": (2,), "schedule_kwargs": {"s": 0.01, "bogus": 1}},
        {"input_shape": (2,), "variance_kwargs": {"vlb_weight": 0.1}},  # upper_bound takes none
        {"input_shape": "2"},
    ],
)
def test_invalid_config_values(kwargs) -> None:
    with pytest.raises(ValidationError):
        DiffusionModelConfig(**kwargs)


def test_zero_terminal_snr_pred_eps_error_is_explained() -> None:
    with pytest.raises(ValidationError, match="pred_v"):
        DiffusionModelConfig(input_shape=(2,), zero_terminal_snr=True, target_type="pred_eps")


# -- loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_type", ["pred_eps", "pred_x_0", "pred_v"])
def test_loss_is_the_target_regression(target_type: str) -> None:
    """With explicit t and noise the loss is (net(x_t, t) - target)^2, target from the paper."""
    model = make(target_type=target_type, noise_schedule_type="linear")
    x, noise, t = torch.randn(16, 2), torch.randn(16, 2), torch.randint(1, 1001, (16,))
    ab = model.alphas_cumprod[t].float()[:, None]
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
    out = model.nn_module(x_t, t.float())
    expected_target = {
        "pred_eps": noise,
        "pred_x_0": x,
        "pred_v": ab.sqrt() * noise - (1 - ab).sqrt() * x,
    }[target_type]
    torch.testing.assert_close(model.loss(x, t=t, noise=noise), (out - expected_target) ** 2)
    torch.testing.assert_close(model(x, t=t, noise=noise), model.loss(x, t=t, noise=noise))


def test_loss_draws_t_uniformly_from_1_to_T() -> None:
    seen: list[torch.Tensor] = []

    class Spy(TinyNet):
        def forward(self, x, t):
            seen.append(t)
            return super().forward(x, t)

    model = DiffusionModel(Spy(), DiffusionModelConfig(input_shape=(2,), num_timesteps=10))
    for _ in range(200):
        model.loss(torch.randn(50, 2))
    t = torch.cat(seen)
    assert t.dtype == torch.float32 and t.min() == 1 and t.max() == 10
    counts = torch.bincount(t.long(), minlength=11)[1:].double()
    # 10000 draws, 10 bins: expected 1000 each, sd ~ 30; 6 sd bound
    assert (counts - 1000).abs().max() < 180


def test_min_snr_gamma_weights_the_loss() -> None:
    model = make(target_type="pred_x_0", min_snr_gamma=2.0, noise_schedule_type="linear")
    plain = make(target_type="pred_x_0", noise_schedule_type="linear")
    plain.load_state_dict(model.state_dict())
    x, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.arange(1, 1001, 125)
    ab = model.alphas_cumprod[t]
    weight = torch.clamp(ab / (1 - ab), max=2.0).float()[:, None]
    torch.testing.assert_close(
        model.loss(x, t=t, noise=noise), weight * plain.loss(x, t=t, noise=noise)
    )


def test_learned_range_hybrid_loss_stops_gradient_through_the_mean() -> None:
    """The VLB term trains only the variance channels: mean-channel gradients equal plain l2's."""
    lr = make(sigma_type="learned_range", noise_schedule_type="linear", target_type="pred_eps")
    x, noise = torch.randn(32, 2), torch.randn(32, 2)
    t = torch.cat([torch.ones(4, dtype=torch.long), torch.randint(2, 1001, (28,))])
    loss = lr.loss(x, t=t, noise=noise)
    assert loss.shape == (32, 2) and torch.isfinite(loss).all()
    last = lr.nn_module.net[-1]
    loss.mean().backward()
    grad_lr = last.weight.grad.clone()
    last.weight.grad = None
    ab = lr.alphas_cumprod[t].float()[:, None]
    out = lr.nn_module(ab.sqrt() * x + (1 - ab).sqrt() * noise, t.float())
    ((out[:, :2] - noise) ** 2).mean().backward()  # plain l2 on the mean channels
    grad_plain = last.weight.grad
    torch.testing.assert_close(grad_lr[:2], grad_plain[:2])
    assert grad_lr[2:].abs().sum() > 0  # the variance channels do learn


@pytest.mark.parametrize("target_type", ["pred_x_0", "pred_v"])
@pytest.mark.parametrize("sigma_type", tinydiff.variances.names())
@pytest.mark.parametrize("loss_type", tinydiff.losses.names())
def test_zero_terminal_snr_loss_is_finite(target_type, sigma_type, loss_type) -> None:
    model = make(
        target_type=target_type,
        sigma_type=sigma_type,
        loss_type=loss_type,
        zero_terminal_snr=True,
        min_snr_gamma=5.0,
    )
    t = torch.tensor([1, 2, 500, 999, 1000, 1000])
    loss = model.loss(torch.randn(6, 2), t=t)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -- sampling API ----------------------------------------------------------------------------
def test_sample_shapes_trajectory_and_init_noise() -> None:
    model = make(num_timesteps=50)
    init = torch.randn(5, 2)
    traj = model.sample(5, 10, init_noise=init, return_trajectory=True, sampler="ddim")
    assert traj.shape == (11, 5, 2)
    assert torch.equal(traj[0], init)
    assert torch.equal(traj[-1], model.sample(5, 10, init_noise=init, sampler="ddim"))
    assert model.sample(3).shape == (3, 2)  # default: all T steps


@pytest.mark.parametrize("sampler", tinydiff.samplers.names())
def test_same_seed_gives_bitwise_identical_samples(sampler: str) -> None:
    model = make(num_timesteps=100)
    a = model.sample(8, 20, sampler=sampler, generator=torch.Generator().manual_seed(1))
    b = model.sample(8, 20, sampler=sampler, generator=torch.Generator().manual_seed(1))
    c = model.sample(8, 20, sampler=sampler, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_respacing_visits_the_trailing_times() -> None:
    seen: list[float] = []

    class Spy(TinyNet):
        def forward(self, x, t):
            seen.append(float(t[0]))
            return super().forward(x, t)

    model = DiffusionModel(Spy(), DiffusionModelConfig(input_shape=(2,), num_timesteps=1000))
    model.sample(2, 4)
    assert seen == [1000.0, 750.0, 500.0, 250.0]
    seen.clear()
    model.sample(2, 4, timestep_spacing="leading")
    assert seen == [751.0, 501.0, 251.0, 1.0]
    seen.clear()
    with pytest.warns(FutureWarning, match="init_noise"):  # starts below T without x_900
        model.sample(2, timestep_spacing=[900, 400, 30])
    assert seen == [900.0, 400.0, 30.0]


def test_progress_bar(capsys) -> None:
    make(num_timesteps=20).sample(2, 20, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_sample_on_image_shapes() -> None:
    model = DiffusionModel(
        TinyConvNet(3), DiffusionModelConfig(input_shape=(3, 8, 8), num_timesteps=20)
    )
    assert model.sample(2, 5).shape == (2, 3, 8, 8)


def test_alpha_bar_method() -> None:
    model = make(num_timesteps=100)
    assert torch.equal(model.alpha_bar(torch.arange(101.0)), model.alphas_cumprod)
    assert model.alpha_bar(50.5).shape == ()
    assert model.alpha_bar(50) > model.alpha_bar(50.5) > model.alpha_bar(51)


# -- bad input -------------------------------------------------------------------------------
def test_bad_x() -> None:
    model = make()
    with pytest.raises(ValueError, match=r"shape \(bsz, \*input_shape\) = \(bsz, 2\)"):
        model.loss(torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        model.loss(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.loss([[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size 0"):
        model.loss(torch.randn(0, 2))
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.randn(4, 2), t=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="real times must lie"):  # real times are in (0, T]
        model.loss(torch.randn(4, 2), t=torch.full((4,), 1e6))


@pytest.mark.parametrize("bsz", [0, -1, 2.5, True])
def test_bad_bsz(bsz) -> None:
    with pytest.raises(ValueError, match="bsz must be a positive int"):
        make().sample(bsz)


@pytest.mark.parametrize("steps", [0, 1001, -5])
def test_bad_sampling_timesteps(steps: int) -> None:
    with pytest.raises(ValueError, match=r"sampling_timesteps must be an int in 1..1000"):
        make().sample(2, steps)
    with pytest.raises(TypeError, match="sampling_timesteps must be an int"):
        make().sample(2, 10.0)  # type: ignore[arg-type]


def test_bad_init_noise() -> None:
    with pytest.raises(ValueError, match=r"init_noise must have shape .*\(4, 2\), got \(4, 3\)"):
        make().sample(4, 5, init_noise=torch.randn(4, 3))


def test_bad_sampler_name_and_options() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'ddin'.*Did you mean 'ddim'"):
        make().sample(2, 5, sampler="ddin")
    with pytest.raises(TypeError, match="Accepted options: eta"):
        make().sample(2, 5, sampler="ddim", sampler_kwargs={"etta": 1.0})
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        make().sample(2, 5, timestep_spacing="trailling")


def test_learned_range_with_wrong_channels() -> None:
    model = DiffusionModel(
        TinyNet(2, 1), DiffusionModelConfig(input_shape=(2,), sigma_type="learned_range")
    )
    with pytest.raises(
        ValueError, match=r"expected shape \(4, 4\).*learned_range.*2x the input channels"
    ):
        model.loss(torch.randn(4, 2))
    with pytest.raises(ValueError, match="learned_range"):
        model.sample(4, 2)


def test_network_returning_the_wrong_shape() -> None:
    class Bad(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    with pytest.raises(ValueError, match=r"nn_module returned \(3, 1\); expected shape \(3, 2\)"):
        DiffusionModel(Bad(), {"input_shape": [2]}).loss(torch.randn(3, 2))
