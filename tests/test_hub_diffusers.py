"""A model converted from diffusers reloads with a plain `from_pretrained(path)`: the diffusers
class (from an allowlist) and its config are recorded in config.json, the network is rebuilt
on the meta device and checked against the weights' header before anything is allocated."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from _nets import tiny_diffusers_unet  # noqa: E402

from tinydiff import DiffusionModel  # noqa: E402
from tinydiff.diffusers_compat import DiffusersUNet  # noqa: E402
from tinydiff.hub import DIFFUSERS_NETWORKS, SerializationError  # noqa: E402


def _unet(cls: Any = None, **extra: Any) -> Any:
    torch.manual_seed(0)
    common = {"sample_size": 8, "in_channels": 2, "out_channels": 2, "layers_per_block": 1}
    common.update(block_out_channels=(8, 16), norm_num_groups=4)
    if cls is diffusers.UNet2DConditionModel:
        return cls(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
            **extra,
        )
    return diffusers.UNet2DModel(
        **common,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **extra,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> DiffusionModel:
    """`from_diffusers` of a tiny DDPM pipeline folder (UNet2DModel, 50 training steps)."""
    folder = tmp_path_factory.mktemp("pipeline")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule="linear")
    pipeline = diffusers.DDPMPipeline(unet=_unet(), scheduler=scheduler)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DiffusionModel.from_diffusers(folder)


def _draw(model: DiffusionModel) -> torch.Tensor:
    return model.sample(3, 4, sampler="ddpm", generator=torch.Generator().manual_seed(11))


def test_converted_model_reloads_with_no_other_argument(converted, tmp_path):
    converted.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["network"]["class_name"] == "diffusers.UNet2DModel"
    assert doc["network"]["config"]["block_out_channels"] == [8, 16]
    assert not any(k.startswith("_") for k in doc["network"]["config"])
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".safetensors", ".md"}  # no pickle
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert type(loaded.nn_module) is DiffusersUNet
    assert type(loaded.nn_module.unet) is diffusers.UNet2DModel
    for key, value in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    converted.eval()
    assert torch.equal(_draw(loaded), _draw(converted))
    assert "from_pretrained(" in (tmp_path / "README.md").read_text()


def test_conditional_unet_is_recorded(tmp_path):
    unet = _unet(diffusers.UNet2DConditionModel)
    model = DiffusionModel(DiffusersUNet(unet), input_shape=(2, 8, 8), num_timesteps=20)
    model.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert type(loaded.nn_module.unet) is diffusers.UNet2DConditionModel
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 17.0])
    cond = {"encoder_hidden_states": torch.randn(2, 4, 8)}
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.nn_module(x, t, **cond), model.nn_module(x, t, **cond))


def test_only_allowlisted_classes_are_rebuilt(converted, tmp_path):
    converted.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    for name in ("diffusers.AutoencoderKL", "diffusers.UNet2DModel.__init__", "os.system"):
        doc["network"]["class_name"] = name
        (tmp_path / "config.json").write_text(json.dumps(doc))
        with pytest.raises(SerializationError, match=r"nn_module=") as err:
            DiffusionModel.from_pretrained(tmp_path)
        assert "diffusers.UNet2DModel" in str(err.value)  # the allowed ones are named
    assert set(DIFFUSERS_NETWORKS) == {"UNet2DModel", "UNet2DConditionModel"}


def _edited(converted: DiffusionModel, folder: Path, **changes: Any) -> None:
    converted.save_pretrained(folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["network"]["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(doc))


def test_oversized_config_is_refused_before_allocation(converted, tmp_path, monkeypatch):
    """block_out_channels [8, 12000] with the tiny weights file: refused by the header check
    on the meta device; no tensor of the network is ever allocated on the CPU."""
    _edited(converted, tmp_path, block_out_channels=[8, 12000])
    real = diffusers.UNet2DModel.from_config
    devices = []

    def from_config(*args: Any, **kwargs: Any) -> Any:
        devices.append(torch.empty(0).device.type)  # the default device inside the build
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DModel, "from_config", from_config)
    with pytest.raises(SerializationError, match=r"shape .* in the file, .* expected"):
        DiffusionModel.from_pretrained(tmp_path)
    assert devices == ["meta"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"layers_per_block": 10**6}, "out of range"),
        ({"block_out_channels": [8] * 1000}, "more than the"),
        ({"block_out_channels": [[[8]]]}, "nested deeper"),
        ({"block_out_channels": {"a": 1}}, "nested deeper"),
        ({"sample_size": 2**40}, "out of range"),
        ({"no_such_option": 1}, "does not take: no_such_option"),
        ({"norm_num_groups": 5}, "cannot build diffusers.UNet2DModel"),
    ],
    ids=["layers", "long-list", "deep-list", "dict", "huge-int", "unknown-key", "invalid"],
)
def test_malformed_diffusers_config(converted, tmp_path, changes, match):
    _edited(converted, tmp_path, **changes)
    with pytest.raises(SerializationError, match=match):
        DiffusionModel.from_pretrained(tmp_path)


def test_unlisted_diffusers_class_is_saved_as_a_custom_network(tmp_path):
    class MyUNet(diffusers.UNet2DModel):  # a subclass is not diffusers' own class
        pass

    unet = tiny_diffusers_unet(MyUNet)
    model = DiffusionModel(DiffusersUNet(unet), input_shape=(2, 8, 8), num_timesteps=20)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["network"] is None
    with pytest.raises(SerializationError, match="nn_module="):
        DiffusionModel.from_pretrained(tmp_path)
