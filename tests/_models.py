"""Small DiffusionModels shared by the tests: random-weight networks (serialization, Hub) and
exact models around the Gaussian-mixture denoiser of tinydiff.testing."""

from __future__ import annotations

from typing import Any

import torch

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.nn import MLP, UNet
from tinydiff.testing import ExactDenoiser, GaussianMixture

#: four Gaussians (std 0.5) on the circle of radius 2: the default data of `exact_model`
RING = GaussianMixture([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.5)


def exact_model(
    mixture: GaussianMixture = RING, *, dtype: torch.dtype = torch.float64, **config: Any
) -> DiffusionModel:
    """A DiffusionModel whose network is the exact denoiser of ``mixture``.

    Args:
        mixture: the data distribution (its event shape is the config's input_shape).
        dtype: the dtype the model samples in (float64 by default; float32 as built).
        **config: DiffusionModelConfig fields (num_timesteps defaults to the config's 1000).
    """
    config = {"input_shape": mixture.event_shape, **config}
    return DiffusionModel(ExactDenoiser(mixture, config), config).to(dtype)


def _perturb(model: DiffusionModel, seed: int = 1) -> None:
    """Random weights everywhere (the built-in nets zero their output layer at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.nn_module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def mlp_model(ema: bool = False) -> DiffusionModel:
    net = MLP(2, hidden_dim=16, num_layers=1, time_embed_dim=8)
    model = DiffusionModel(net, DiffusionModelConfig(input_shape=(2,), num_timesteps=40))
    _perturb(model)
    if ema:
        model.enable_ema(0.5, warmup=False, update_every=2)
        _perturb(model, seed=2)
        model.update_ema()
        model.update_ema()  # one averaging update: EMA weights differ from the live ones
    return model


def unet_model(ema: bool = False) -> DiffusionModel:
    net = UNet(
        in_channels=1,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_groups=4,
    )
    config = DiffusionModelConfig(input_shape=(1, 8, 8), num_timesteps=30, target_type="pred_v")
    model = DiffusionModel(net, config)
    _perturb(model)
    if ema:
        model.enable_ema(0.9)
        _perturb(model, seed=3)
        model.update_ema()
    return model


def draw(model: DiffusionModel, use_ema: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return model.sample(4, 5, generator=g, use_ema=use_ema)
