"""The 0.2 public names: the seed constructor form, variance_type (sigma_type still accepted),
lazy subpackages, the public denoiser, and configs saved by 0.1 loading unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tinydiff
from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.nn import MLP


def test_seed_constructor_form_merges_keywords_into_the_config() -> None:
    net = tinydiff.nn.UNet(in_channels=1, base_channels=8)
    model = DiffusionModel(
        nn_module=net,
        num_timesteps=500,
        input_shape=(1, 32, 32),
        config=DiffusionModelConfig(
            target_type="pred_x_0",
            sigma_type="upper_bound",
            noise_schedule_type="cosine",
            loss_type="l2",
        ),
    )
    assert model.config.num_timesteps == 500 and model.input_shape == (1, 32, 32)
    assert model.config.target_type == "pred_x_0" and model.config.variance_type == "upper_bound"
    assert model.loss(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_keyword_conflicting_with_the_config_is_an_error() -> None:
    cfg = DiffusionModelConfig(input_shape=(2,), num_timesteps=100)
    with pytest.raises(ValueError, match="num_timesteps=500 was given.*num_timesteps=100"):
        DiffusionModel(MLP(2), cfg, num_timesteps=500)
    # the same value in both places is no conflict
    assert DiffusionModel(MLP(2), cfg, num_timesteps=100).num_timesteps == 100
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['num_steps'\\]"):
        DiffusionModel(MLP(2), cfg, num_steps=3)


def test_input_shape_is_required_somewhere() -> None:
    with pytest.raises(ValueError, match="input_shape is required"):
        DiffusionModel(MLP(2), DiffusionModelConfig(num_timesteps=10))


def test_variance_type_with_sigma_type_alias() -> None:
    a = DiffusionModelConfig(input_shape=(2,), sigma_type="fixed_small")
    b = DiffusionModelConfig(input_shape=(2,), variance_type="lower_bound")
    assert a == b and a.sigma_type == "lower_bound"
    dumped = json.loads(a.model_dump_json())
    assert dumped["variance_type"] == "lower_bound" and "sigma_type" not in dumped
    assert DiffusionModelConfig.model_validate_json(a.model_dump_json()) == a


def test_subpackages_load_on_first_access() -> None:
    assert tinydiff.nn.MLP is MLP
    assert tinydiff.testing.GaussianMixture is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tinydiff.nope  # type: ignore[attr-defined]


def test_config_saved_by_v0_1_loads(tmp_path: Path) -> None:
    """A schema_version 1 folder (config field ``sigma_type``, as 0.1 wrote it) still loads."""
    torch.manual_seed(0)
    model = DiffusionModel(MLP(2), DiffusionModelConfig(input_shape=(2,), sigma_type="fixed_small"))
    folder = model.save_pretrained(tmp_path / "m")
    doc = json.loads((folder / "config.json").read_text())
    doc["schema_version"] = 1
    doc["model"]["sigma_type"] = doc["model"].pop("variance_type")
    (folder / "config.json").write_text(json.dumps(doc))
    loaded = DiffusionModel.from_pretrained(folder)
    assert loaded.config == model.config
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_public_denoiser_gives_x0_and_eps_of_the_process() -> None:
    """x_t = alpha x0_hat + sigma eps_hat for the denoiser's outputs, at a process point."""
    torch.manual_seed(0)
    model = DiffusionModel(MLP(2), input_shape=(2,), target_type="pred_v").double()
    x = torch.randn(5, 2, dtype=torch.float64)
    point = model.process.points(torch.tensor(300.0, dtype=torch.float64))
    pred = model.denoiser()(x, point)
    alpha, sigma = model.process.alpha_sigma(torch.tensor(300.0, dtype=torch.float64))
    torch.testing.assert_close(alpha * pred.x0 + sigma * pred.eps, x)
