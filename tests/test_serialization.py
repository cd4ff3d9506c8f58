"""save_pretrained / from_pretrained on local folders, and every kind of bad file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from _models import draw, mlp_model, unet_model
from _nets import TinyNet
from safetensors.torch import load_file, save_file

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.hub import (
    MANIFEST_NAME,
    PLAIN_SCHEMA_VERSION,
    SCHEMA_VERSION,
    ModelNotFoundError,
    SerializationError,
    read_safetensors,
)
from tinydiff.nn import MLP


@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
@pytest.mark.parametrize("build", [mlp_model, unet_model], ids=["mlp", "unet"])
def test_round_trip_is_bitwise(tmp_path, build, ema):
    model = build(ema)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "README.md",
        MANIFEST_NAME,
        *(["ema.safetensors"] if ema else []),
    }
    loaded = DiffusionModel.from_pretrained(tmp_path)  # the EMA when there is one
    assert type(loaded.nn_module) is type(model.nn_module)
    assert loaded.nn_module.config == model.nn_module.config
    assert loaded.config == model.config
    assert torch.equal(draw(loaded), draw(model))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    if ema:
        assert loaded.ema is not None
        assert (loaded.ema.decay, loaded.ema.warmup, loaded.ema.update_every) == (
            model.ema.decay,
            model.ema.warmup,
            model.ema.update_every,
        )
        assert loaded.ema.num_updates == model.ema.num_updates
        assert loaded.ema.num_calls == model.ema.num_calls
        assert torch.equal(draw(loaded, use_ema=True), draw(model, use_ema=True))
        assert not torch.equal(draw(model, use_ema=True), draw(model))
        as_live = DiffusionModel.from_pretrained(tmp_path, use_ema_weights=True)
        assert as_live.ema is None
        assert torch.equal(draw(as_live), draw(model, use_ema=True))
    else:
        assert loaded.ema is None


def test_config_json_contents(tmp_path):
    model = mlp_model(ema=True)
    model.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    import tinydiff

    assert doc["schema_version"] == PLAIN_SCHEMA_VERSION == 3 and SCHEMA_VERSION == 4
    assert doc["tinydiff_version"] == tinydiff.__version__
    assert DiffusionModelConfig.model_validate(doc["model"]) == model.config
    assert doc["network"] == {"class_name": "tinydiff.nn.MLP", "config": model.nn_module.config}
    assert doc["ema"] == {"decay": 0.5, "warmup": False, "update_every": 2}
    assert set(doc) == {*_CONFIG_KEYS, "_tinydiff_save_id"}
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


_CONFIG_KEYS = ("schema_version", "library_name", "tinydiff_version", "dtype", "model")
_CONFIG_KEYS += ("network", "ema")


def test_model_card(tmp_path):
    mlp_model().save_pretrained(tmp_path, repo_id="me/swiss")
    card = (tmp_path / "README.md").read_text()
    front, _, body = card.removeprefix("---\n").partition("\n---\n")
    assert "library_name: tinydiff" in front
    assert "tags:\n- diffusion\n- tinydiff" in front
    assert "| `num_timesteps` | `40` |" in body
    assert 'DiffusionModel.from_pretrained("me/swiss")' in body


def test_saving_without_ema_removes_a_stale_ema_file(tmp_path):
    mlp_model(ema=True).save_pretrained(tmp_path)
    mlp_model(ema=False).save_pretrained(tmp_path)
    assert not (tmp_path / "ema.safetensors").exists()
    assert DiffusionModel.from_pretrained(tmp_path).ema is None
    with pytest.raises(SerializationError, match="no EMA weights"):
        DiffusionModel.from_pretrained(tmp_path, load_ema=True)
    with pytest.raises(ValueError, match="exclusive"):
        DiffusionModel.from_pretrained(tmp_path, load_ema=True, use_ema_weights=True)


def test_float64_model_round_trips(tmp_path):
    model = mlp_model().double()
    model.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        loaded.sample(4, 3, init_noise=x, generator=g1),
        model.sample(4, 3, init_noise=x, generator=g2),
    )


def _edit_weights(path: Path, edit) -> None:
    """Rewrite a saved weights file with ``edit(state)`` applied, keeping its header metadata
    (the save id): the folder stays one save, only the tensors change."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata=metadata)


# -- custom networks ---------------------------------------------------------------------------
def custom_model() -> DiffusionModel:
    return DiffusionModel(TinyNet(2), DiffusionModelConfig(input_shape=(2,), num_timesteps=20))


def test_custom_network_needs_nn_module(tmp_path):
    model = custom_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["network"] is None
    assert "nn_module=MyNet" in (tmp_path / "README.md").read_text()
    with pytest.raises(SerializationError, match="architecture is not stored.*nn_module="):
        DiffusionModel.from_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path, nn_module=TinyNet(2))
    assert torch.equal(draw(loaded), draw(model))


def test_wrong_architecture_names_the_keys(tmp_path):
    custom_model().save_pretrained(tmp_path)
    with pytest.raises(SerializationError) as err:
        DiffusionModel.from_pretrained(tmp_path, nn_module=TinyNet(2, hidden=16))
    assert "nn_module.net.0.weight: shape (32, 3) in the file, (16, 3) expected" in str(err.value)
    with pytest.raises(
        SerializationError,
        match=r"missing keys: nn_module\.blocks.*more.*unexpected keys: nn_module\.net",
    ):
        DiffusionModel.from_pretrained(tmp_path, nn_module=MLP(2))


def test_missing_and_unexpected_tensors(tmp_path):
    model = custom_model()
    model.save_pretrained(tmp_path)

    def edit(state):
        state["nn_module.extra"] = torch.zeros(3)
        del state["nn_module.net.2.bias"]

    _edit_weights(tmp_path / "model.safetensors", edit)
    with pytest.raises(SerializationError) as err:
        DiffusionModel.from_pretrained(tmp_path, nn_module=TinyNet(2))
    msg = str(err.value)
    assert "missing keys: nn_module.net.2.bias" in msg
    assert "unexpected keys: nn_module.extra" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64])
def test_wrong_dtype_is_refused(tmp_path, dtype):
    custom_model().save_pretrained(tmp_path)

    def edit(state):
        state["nn_module.net.0.bias"] = state["nn_module.net.0.bias"].to(dtype)

    _edit_weights(tmp_path / "model.safetensors", edit)
    with pytest.raises(SerializationError, match=rf"net\.0\.bias: dtype {dtype} in the file"):
        DiffusionModel.from_pretrained(tmp_path, nn_module=TinyNet(2))


# -- files that are not there or refused --------------------------------------------------------
def test_missing_folder_or_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a valid Hub"):
        DiffusionModel.from_pretrained(tmp_path / "nope" / "deeper" / "still")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        DiffusionModel.from_pretrained(tmp_path)
    mlp_model().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a file"):
        DiffusionModel.from_pretrained(tmp_path / "config.json")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="has no model.safetensors"):
        DiffusionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickled_weights_are_refused(tmp_path, name, monkeypatch):
    mlp_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / name).write_bytes(b"\x80\x04 not really a pickle")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SerializationError, match=rf"{name}.*never unpickles"):
        DiffusionModel.from_pretrained(tmp_path)


# -- bad config.json ---------------------------------------------------------------------------
def _edit_config(folder: Path, edit) -> None:
    doc = json.loads((folder / "config.json").read_text())
    edit(doc)
    (folder / "config.json").write_text(json.dumps(doc))


def test_newer_schema_is_refused(tmp_path):
    mlp_model().save_pretrained(tmp_path)
    _edit_config(
        tmp_path, lambda d: d.update(schema_version=SCHEMA_VERSION + 1, new_field={"x": 1})
    )
    with pytest.raises(SerializationError, match="newer tinydiff.*upgrade"):
        DiffusionModel.from_pretrained(tmp_path)


def test_unregistered_plugin_component(tmp_path):
    mlp_model().save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda d: d["model"].update(sampler_type="fancy_plugin_sampler"))
    with pytest.raises(
        SerializationError, match="sampler_type='fancy_plugin_sampler'.*plugin.*not installed"
    ):
        DiffusionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["model"].update(surprise=1), "surprise"),
        (lambda d: d["model"].update(num_timesteps="many"), "num_timesteps"),
        (lambda d: d.update(schema_version="1"), "no integer schema_version"),
        (lambda d: d.pop("schema_version"), "no integer schema_version"),
        (lambda d: d.update(network={"class_name": "os.system", "config": {}}), "not a built-in"),
        (lambda d: d["network"]["config"].update(hidden_dim=-3), "cannot build tinydiff.nn.MLP"),
        (lambda d: d["network"]["config"].update(bogus=1), "cannot build tinydiff.nn.MLP"),
        (lambda d: d.update(ema={"decay": "0.5", "warmup": True, "update_every": 1}), "decay"),
        (lambda d: d.update(dtype="float8"), "unknown dtype"),
    ],
    ids=[
        "extra-field",
        "extra-model-field",
        "wrong-type",
        "schema-as-str",
        "no-schema",
        "class-path",
        "bad-net-arg",
        "unknown-net-arg",
        "ema-wrong-type",
        "bad-dtype",
    ],
)
def test_bad_config_json(tmp_path, edit, match):
    mlp_model().save_pretrained(tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(SerializationError, match=match):
        DiffusionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", "\xff\xfe"])
def test_invalid_json(tmp_path, text):
    mlp_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(SerializationError, match="config.json"):
        DiffusionModel.from_pretrained(tmp_path)


# -- bad safetensors ---------------------------------------------------------------------------
def _header_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def test_truncated_safetensors(tmp_path):
    model = mlp_model()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    full = path.read_bytes()
    for cut in (len(full) - 1, len(full) // 2, 20, 5, 0):
        path.write_bytes(full[:cut])
        with pytest.raises(SerializationError, match="truncated|corrupt|not a safetensors"):
            DiffusionModel.from_pretrained(tmp_path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    _header_file(path, {}, length=2**63)
    with pytest.raises(SerializationError, match="header claims"):
        read_safetensors(path)


def test_header_over_the_cap_is_refused_before_reading(tmp_path, monkeypatch):
    import tinydiff.hub

    monkeypatch.setattr(tinydiff.hub, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "w.safetensors"
    _header_file(path, {"__metadata__": {"pad": "x" * 100}})
    with pytest.raises(SerializationError, match="header claims 129 bytes, more than the 64"):
        read_safetensors(path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}, "overflow"),
        ({"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}, "not fully covered"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2**40], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "integer `-1`"),
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unknown variant `Q4`"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "invalid offset"),
        ({"dtype": "F32", "shape": [2]}, "missing field `data_offsets`"),
    ],
    ids=[
        "huge",
        "beyond-eof",
        "size-mismatch",
        "huge-shape",
        "negative",
        "dtype",
        "reversed",
        "keys",
    ],
)
def test_crafted_headers(tmp_path, entry, match):
    path = tmp_path / "w.safetensors"
    _header_file(path, {"w": entry}, data=b"\0" * 8)
    with pytest.raises(SerializationError, match=match):
        read_safetensors(path)


@pytest.mark.parametrize("header", [b"\xff\xfe", b"{oops", b"[]"])
def test_header_not_json(tmp_path, header):
    path = tmp_path / "w.safetensors"
    _header_file(path, header)
    with pytest.raises(SerializationError, match="header"):
        read_safetensors(path)


def test_valid_file_reads_back(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(tensors, tmp_path / "ok.safetensors")
    back = read_safetensors(tmp_path / "ok.safetensors")
    assert set(back) == {"a", "b"}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_corrupt_ema_file(tmp_path):
    mlp_model(ema=True).save_pretrained(tmp_path)
    path = tmp_path / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    assert DiffusionModel.from_pretrained(tmp_path, load_ema=False).ema is None  # not read
    with pytest.raises(SerializationError, match="ema.safetensors.*pass load_ema=False"):
        DiffusionModel.from_pretrained(tmp_path)  # read by default: the hint says how not to
    with pytest.raises(SerializationError, match="ema.safetensors"):
        DiffusionModel.from_pretrained(tmp_path, load_ema=True)
    with pytest.raises(SerializationError, match="ema.safetensors"):
        DiffusionModel.from_pretrained(tmp_path, use_ema_weights=True)


def test_subclass_from_pretrained_builds_the_subclass(tmp_path):
    class MyModel(DiffusionModel):
        pass

    mlp_model().save_pretrained(tmp_path)
    assert type(MyModel.from_pretrained(tmp_path)) is MyModel


# -- loaded models that sample right -----------------------------------------------------------
def test_loaded_model_is_in_eval_mode_with_its_ema(tmp_path):
    model = mlp_model(ema=True)
    model.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert loaded.ema is not None and not any(m.training for m in loaded.ema.averaged.modules())
    assert torch.equal(draw(loaded, use_ema=True), draw(model, use_ema=True))
    assert DiffusionModel.from_pretrained(tmp_path, load_ema=False).ema is None
    assert DiffusionModel.from_pretrained(tmp_path, use_ema_weights=True).ema is None
    with pytest.raises(TypeError, match="load_ema must be None, True or False"):
        DiffusionModel.from_pretrained(tmp_path, load_ema="yes")


def test_use_ema_without_ema_says_how_to_load_it(tmp_path):
    mlp_model(ema=True).save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path, load_ema=False)
    with pytest.raises(ValueError, match="from_pretrained.*load_ema=True.*enable_ema"):
        loaded.sample(2, 2, use_ema=True)


def test_missing_ema_file_names_the_way_out(tmp_path):
    mlp_model(ema=True).save_pretrained(tmp_path)
    (tmp_path / "ema.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no ema.safetensors, which its manifest.*lo"):
        DiffusionModel.from_pretrained(tmp_path)
    assert DiffusionModel.from_pretrained(tmp_path, load_ema=False).ema is None


def test_folder_saved_by_0_2_loads(tmp_path):
    """tinydiff 0.2 wrote the same files without save ids and manifest (schema 2)."""
    model = mlp_model(ema=True)
    model.save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(load_file(tmp_path / name), tmp_path / name)  # no metadata
    doc = json.loads((tmp_path / "config.json").read_text())
    del doc["_tinydiff_save_id"]
    (tmp_path / "config.json").write_text(json.dumps({**doc, "schema_version": 2}))
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert torch.equal(draw(loaded), draw(model))
    assert torch.equal(draw(loaded, use_ema=True), draw(model, use_ema=True))
    model.save_pretrained(tmp_path)  # saved again: a manifest, and it loads
    assert (tmp_path / MANIFEST_NAME).exists()
    assert torch.equal(draw(DiffusionModel.from_pretrained(tmp_path)), draw(model))


def test_hand_copied_weights_are_a_mix(tmp_path):
    """Weights of another save dropped into a folder: a clear MixedSaveError, not a load."""
    from tinydiff.hub import MixedSaveError

    mlp_model().save_pretrained(tmp_path / "a")
    other = mlp_model()
    with torch.no_grad():
        other.nn_module.output.bias.add_(1.0)
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(MixedSaveError, match="mixes files of two saves"):
        DiffusionModel.from_pretrained(tmp_path / "a")
