"""Explicit sampling times in the config: validation, JSON round trip, save_pretrained, and
the per-sampler default spacing."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tinydiff import DiffusionModel, DiffusionModelConfig, samplers, spacings
from tinydiff.nn import MLP

TIMES = (1000.0, 612.5, 240.25, 31.0, 0.0)


def test_explicit_times_round_trip_through_json() -> None:
    cfg = DiffusionModelConfig(input_shape=(2,), timestep_spacing=list(TIMES))
    assert cfg.timestep_spacing == TIMES
    back = DiffusionModelConfig.model_validate_json(cfg.model_dump_json())
    assert back == cfg and back.timestep_spacing == TIMES


def test_a_final_zero_is_appended_and_tensors_are_accepted() -> None:
    cfg = DiffusionModelConfig(input_shape=(2,), timestep_spacing=torch.tensor(TIMES[:-1]))
    assert cfg.timestep_spacing == TIMES


@pytest.mark.parametrize(
    "times",
    [(1000.0, 1200.0, 0.0), (500.0, 600.0, 0.0), (500.0, 500.0, 0.0), (-1.0,), (), ("a", 0)],
)
def test_bad_explicit_times_are_refused(times) -> None:
    with pytest.raises(ValidationError):
        DiffusionModelConfig(input_shape=(2,), timestep_spacing=times)


def test_names_are_still_canonicalised() -> None:
    assert DiffusionModelConfig(input_shape=(2,), timestep_spacing="log_snr").timestep_spacing == (
        "logsnr"
    )
    assert DiffusionModelConfig(input_shape=(2,)).timestep_spacing is None


def test_config_times_are_sampled_and_saved(tmp_path) -> None:
    net = MLP(2, hidden_dim=8, num_layers=1)
    model = DiffusionModel(net, DiffusionModelConfig(input_shape=(2,), timestep_spacing=TIMES))
    assert model.sampling_timesteps().tolist() == list(TIMES)
    assert model.sampling_timesteps(4).tolist() == list(TIMES)
    with pytest.raises(ValueError, match="4 steps"):
        model.sampling_timesteps(6)
    model.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert loaded.config.timestep_spacing == TIMES


def test_default_spacing_is_the_samplers() -> None:
    model = DiffusionModel(
        MLP(2, hidden_dim=8, num_layers=1), DiffusionModelConfig(input_shape=(2,))
    )
    ab = model.alphas_cumprod
    for name in samplers.names():
        default = samplers.get(name).default_spacing
        assert default in spacings.names()
        want = spacings.make_timesteps(default, 1000, 7, ab)
        assert torch.equal(model.sampling_timesteps(7, sampler=name), want)


@pytest.mark.parametrize(
    "times",
    [
        torch.tensor([True, False]),
        torch.tensor([500.0 + 0j, 0j]),
        torch.tensor([[500.0, 100.0, 0.0]]),
        (500.0, float("nan"), 0.0),
        (500.0, float("inf"), 0.0),
        5.0,
    ],
)
def test_tensors_of_the_wrong_kind_are_refused_not_flattened(times) -> None:
    with pytest.raises(ValidationError, match="timestep_spacing"):
        DiffusionModelConfig(input_shape=(2,), timestep_spacing=times)


def test_the_config_and_the_model_share_one_rule() -> None:
    """The config checks explicit times without a process; sampling resolves the same times."""
    cfg = DiffusionModelConfig(input_shape=(2,), timestep_spacing=torch.tensor(TIMES))
    assert torch.equal(
        spacings.explicit_times(torch.tensor(TIMES), 1000), torch.tensor(TIMES).double()
    )
    model = DiffusionModel(MLP(2, hidden_dim=8, num_layers=1), cfg)
    assert torch.equal(model.sampling_timesteps(), spacings.resolve(TIMES, model.process, 4))


def test_explicit_times_below_T_without_a_start_sample_warn() -> None:
    """x_T is drawn at the level of t = T: explicit times that start lower need the sample at
    their first time (a FutureWarning in 0.3); a start sample, times from T and named
    spacings (``leading`` starts below T by design) do not warn."""
    import warnings

    model = DiffusionModel(MLP(2, hidden_dim=8, num_layers=1), input_shape=(2,))
    with pytest.warns(FutureWarning, match="start at t = 500 < T = 1000"):
        model.sample(2, timestep_spacing=[500, 200, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.sample(2, timestep_spacing=[500, 200, 0], init_noise=torch.randn(2, 2))
        model.sample(2, timestep_spacing=[1000, 200, 0])
        model.sample(2, 7, timestep_spacing="leading")
        model.sampling_timesteps(None, [500, 200, 0])  # only the times: nothing is drawn
