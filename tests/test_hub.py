"""push_to_hub / from_pretrained against the loopback Hub server, through the real huggingface_hub."""

from __future__ import annotations

import pytest
import torch
from _models import draw, mlp_model, unet_model
from huggingface_hub import HfApi, constants

from tinydiff import DiffusionModel
from tinydiff.hub import MANIFEST_NAME, ModelNotFoundError, SerializationError


def test_push_then_pull(hub):
    model = mlp_model(ema=True)
    commit = model.push_to_hub(f"{hub.user}/swiss", token=hub.token)
    assert commit.startswith(hub.endpoint)
    assert len(commit.oid) == 40
    api = HfApi(token=hub.token)
    assert set(api.list_repo_files(f"{hub.user}/swiss")) == {
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "ema.safetensors",
        "README.md",
        MANIFEST_NAME,
    }
    assert api.model_info(f"{hub.user}/swiss").sha == commit.oid
    loaded = DiffusionModel.from_pretrained(f"{hub.user}/swiss")  # the EMA by default
    assert loaded.ema is not None and not loaded.training
    assert torch.equal(draw(loaded), draw(model))
    assert torch.equal(draw(loaded, use_ema=True), draw(model, use_ema=True))
    ema_live = DiffusionModel.from_pretrained(f"{hub.user}/swiss", use_ema_weights=True)
    assert torch.equal(draw(ema_live), draw(model, use_ema=True))


def test_push_unet_and_custom_network(hub):
    from _nets import TinyNet

    from tinydiff import DiffusionModelConfig

    unet = unet_model()
    unet.push_to_hub(f"{hub.user}/unet", token=hub.token)
    assert torch.equal(draw(DiffusionModel.from_pretrained(f"{hub.user}/unet")), draw(unet))

    custom = DiffusionModel(TinyNet(2), DiffusionModelConfig(input_shape=(2,), num_timesteps=20))
    custom.push_to_hub(f"{hub.user}/custom", token=hub.token)
    with pytest.raises(SerializationError, match="nn_module="):
        DiffusionModel.from_pretrained(f"{hub.user}/custom")
    loaded = DiffusionModel.from_pretrained(
        f"{hub.user}/custom", nn_module=TinyNet(2), revision="main"
    )
    assert torch.equal(draw(loaded), draw(custom))


def test_revision_pinning(hub):
    repo = f"{hub.user}/pinned"
    old = mlp_model()
    first = old.push_to_hub(repo, token=hub.token, commit_message="v1")
    new = mlp_model()
    with torch.no_grad():
        new.nn_module.output.bias.add_(1.0)
    second = new.push_to_hub(repo, token=hub.token, commit_message="v2")
    assert first.oid != second.oid
    assert torch.equal(draw(DiffusionModel.from_pretrained(repo)), draw(new))
    pinned = DiffusionModel.from_pretrained(repo, revision=first.oid)
    assert torch.equal(draw(pinned), draw(old))
    assert not torch.equal(draw(pinned), draw(new))
    with pytest.raises(ModelNotFoundError, match="revision 'nope' not found"):
        DiffusionModel.from_pretrained(repo, revision="nope")


def test_push_to_a_branch(hub):
    repo = f"{hub.user}/branched"
    main = mlp_model()
    main.push_to_hub(repo, token=hub.token)
    dev = mlp_model(ema=True)
    dev.push_to_hub(repo, token=hub.token, revision="dev")
    assert DiffusionModel.from_pretrained(repo, revision="dev", load_ema=True).ema is not None
    assert DiffusionModel.from_pretrained(repo, revision="dev").ema is not None
    assert DiffusionModel.from_pretrained(repo).ema is None


def test_private_repo_needs_a_token(hub, monkeypatch):
    repo = f"{hub.user}/secret"
    model = mlp_model()
    model.push_to_hub(repo, private=True, token=hub.token)
    assert HfApi(token=hub.token).model_info(repo).private
    for token in (None, False, "hf_other_token"):
        with pytest.raises(ModelNotFoundError, match="not found, or private: pass token=") as err:
            DiffusionModel.from_pretrained(repo, token=token)
        assert err.value.__cause__ is None and err.value.__suppress_context__
    loaded = DiffusionModel.from_pretrained(repo, token=hub.token)
    assert torch.equal(draw(loaded), draw(model))
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the implicit token
    assert torch.equal(draw(DiffusionModel.from_pretrained(repo)), draw(model))


def test_offline_mode_from_the_cache(hub, monkeypatch):
    repo = f"{hub.user}/cached"
    model = mlp_model(ema=True)
    model.push_to_hub(repo, token=hub.token)
    DiffusionModel.from_pretrained(repo, load_ema=False)  # caches all but ema.safetensors
    received = len(hub.requests)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = DiffusionModel.from_pretrained(repo, load_ema=False)
    assert torch.equal(draw(loaded), draw(model))
    with pytest.raises(ModelNotFoundError, match="ema.safetensors.*not in the local cache"):
        DiffusionModel.from_pretrained(repo, load_ema=True)  # never downloaded
    with pytest.raises(ModelNotFoundError, match="not in the local cache.*load_ema=False"):
        DiffusionModel.from_pretrained(repo)  # the default wants it: says how to do without
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        DiffusionModel.from_pretrained(f"{hub.user}/never-seen")
    assert len(hub.requests) == received  # nothing reached the server

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loaded = DiffusionModel.from_pretrained(repo, local_files_only=True, load_ema=False)
    assert torch.equal(draw(loaded), draw(model))
    assert len(hub.requests) == received


def test_cache_dir_and_force_download(hub, tmp_path):
    repo = f"{hub.user}/cachedir"
    mlp_model().push_to_hub(repo, token=hub.token)
    DiffusionModel.from_pretrained(repo, cache_dir=tmp_path / "c")
    assert any((tmp_path / "c").rglob("model.safetensors"))
    before = len(hub.requests)
    DiffusionModel.from_pretrained(repo, cache_dir=tmp_path / "c", force_download=True)
    assert len(hub.requests) > before


def test_missing_repo_is_a_short_error(hub):
    with pytest.raises(ModelNotFoundError, match=f"repository '{hub.user}/nothing' not found"):
        DiffusionModel.from_pretrained(f"{hub.user}/nothing")
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a valid Hub"):
        DiffusionModel.from_pretrained("not//a valid id")


def test_repo_with_only_pickled_weights_is_refused(hub, tmp_path):
    api = HfApi(token=hub.token)
    repo = api.create_repo("pickled").repo_id
    folder = tmp_path / "m"
    mlp_model().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    api.upload_folder(repo_id=repo, folder_path=folder)
    with pytest.raises(SerializationError, match="pytorch_model.bin.*never unpickles"):
        DiffusionModel.from_pretrained(repo)


def test_model_card_on_the_hub(hub):
    repo = f"{hub.user}/carded"
    mlp_model().push_to_hub(repo, token=hub.token)
    from huggingface_hub import ModelCard

    card = ModelCard.load(repo)
    assert card.data.library_name == "tinydiff"
    assert card.data.tags == ["diffusion", "tinydiff"]
    assert f'from_pretrained("{repo}")' in card.text
