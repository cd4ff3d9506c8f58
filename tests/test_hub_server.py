"""The test hub server, driven by plain huggingface_hub calls, as tinydiff's own hub code will be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    PyTorchModelHubMixin,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

README = "---\nlicense: mit\nlibrary_name: tinydiff\n---\n# A test model\n"


def make_model_folder(folder: Path, seed: int = 0) -> dict[str, bytes]:
    """Write model.safetensors (1 MiB), config.json and README.md; return their bytes by name."""
    generator = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(512, 512, generator=generator)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"seed": seed, "channels": 3}))
    (folder / "README.md").write_text(README)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_endpoint_is_the_local_server(hub):
    assert hub.endpoint.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == hub.endpoint
    assert HfApi().endpoint == hub.endpoint
    assert (
        huggingface_hub.hf_api.api.endpoint == hub.endpoint
    )  # behind huggingface_hub.create_repo & co


def test_requests_to_other_hosts_are_refused_before_sending(hub):
    with pytest.raises(RuntimeError, match="only reach the local test hub"):
        huggingface_hub.get_session().get("https://huggingface.co/api/whoami-v2")


def test_whoami_and_create_repo(hub):
    api = HfApi(token=hub.token)
    assert api.whoami()["name"] == hub.user
    url = api.create_repo("first")  # no namespace: the token's user
    assert url.repo_id == f"{hub.user}/first"
    assert url.startswith(hub.endpoint)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("first")
    assert conflict.value.response.status_code == 409
    assert api.create_repo(f"{hub.user}/first", exist_ok=True).repo_id == url.repo_id
    assert api.list_repo_files(url.repo_id) == [".gitattributes"]  # the Hub's initial commit
    with pytest.raises(HfHubHTTPError) as forbidden:
        api.create_repo("otheruser/theirs")
    assert forbidden.value.response.status_code == 403


@pytest.mark.parametrize("xet", [True, False], ids=["xet-installed", "xet-disabled"])
def test_upload_folder_then_download(hub, tmp_path, monkeypatch, xet):
    # With hf_xet, upload_folder takes the pipelined path; without, a single create_commit.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    folder = tmp_path / "model"
    folder.mkdir()
    contents = make_model_folder(folder)
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("model").repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add model")
    assert len(commit.oid) == 40
    assert api.model_info(repo_id).sha == commit.oid

    for name, content in contents.items():
        path = hf_hub_download(repo_id, name)
        assert Path(path).read_bytes() == content
        assert commit.oid in path  # cached under snapshots/<commit>/
    weights = load_file(hf_hub_download(repo_id, "model.safetensors"))
    expected = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights["weight"], expected, rtol=0, atol=0)

    snapshot = Path(snapshot_download(repo_id))
    assert snapshot.name == commit.oid
    assert sorted(p.name for p in snapshot.iterdir()) == sorted([".gitattributes", *contents])
    assert all((snapshot / name).read_bytes() == content for name, content in contents.items())

    unchanged = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Again")
    assert unchanged.oid == commit.oid  # nothing changed: no new commit, as on the Hub


def test_revisions_pin_old_content(hub, tmp_path):
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("pinned").repo_id
    upload = dict(repo_id=repo_id, path_in_repo="config.json")
    first = api.upload_file(path_or_fileobj=b'{"version": 1}', commit_message="v1", **upload)
    second = api.upload_file(path_or_fileobj=b'{"version": 2}', commit_message="v2", **upload)
    assert first.oid != second.oid

    def read(revision=None, **kwargs):
        return Path(
            hf_hub_download(repo_id, "config.json", revision=revision, **kwargs)
        ).read_bytes()

    assert read() == b'{"version": 2}'
    assert read(first.oid) == b'{"version": 1}'
    assert read(first.oid[:7]) == b'{"version": 1}'
    assert read(second.oid) == b'{"version": 2}'
    old = Path(snapshot_download(repo_id, revision=first.oid, cache_dir=tmp_path / "other"))
    assert (old / "config.json").read_bytes() == b'{"version": 1}'
    assert api.model_info(repo_id, revision=first.oid).sha == first.oid

    api.create_branch(repo_id, branch="dev", revision=first.oid)
    dev = api.upload_file(
        path_or_fileobj=b'{"version": "dev"}', revision="dev", commit_message="d", **upload
    )
    assert read("dev") == b'{"version": "dev"}'
    assert read() == b'{"version": 2}'
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert refs == {"main": second.oid, "dev": dev.oid}


def test_create_commit_adds_and_deletes(hub):
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("ops", repo_type="dataset").repo_id
    api.create_commit(
        repo_id,
        repo_type="dataset",
        commit_message="add",
        operations=[
            CommitOperationAdd("data/a.txt", b"a"),
            CommitOperationAdd("data/b.txt", b"b"),
            CommitOperationAdd("notes.txt", b"n"),
        ],
    )
    api.create_commit(
        repo_id,
        repo_type="dataset",
        commit_message="delete",
        operations=[CommitOperationDelete("data/a.txt")],
    )
    files = api.list_repo_files(repo_id, repo_type="dataset")
    assert sorted(files) == [".gitattributes", "data/b.txt", "notes.txt"]
    tree = {entry.path for entry in api.list_repo_tree(repo_id, repo_type="dataset")}
    assert tree == {".gitattributes", "data", "notes.txt"}
    path = hf_hub_download(repo_id, "b.txt", subfolder="data", repo_type="dataset")
    assert Path(path).read_bytes() == b"b"

    delete = dict(repo_id=repo_id, repo_type="dataset", commit_message="delete")
    api.create_commit(operations=[CommitOperationDelete("data/")], **delete)
    assert sorted(api.list_repo_files(repo_id, repo_type="dataset")) == [
        ".gitattributes",
        "notes.txt",
    ]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(operations=[CommitOperationDelete("data/a.txt")], **delete)


def test_private_repo_needs_its_owners_token(hub, monkeypatch):
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    assert api.model_info(repo_id).private

    for token in (None, False, "hf_other_token"):  # anonymous (401) or another user (404)
        with pytest.raises(RepositoryNotFoundError) as not_found:
            hf_hub_download(repo_id, "config.json", token=token)
        assert not_found.value.response.status_code == (404 if token else 401)
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(repo_id, token=token)
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info(repo_id)
    with pytest.raises(HfHubHTTPError) as invalid:
        hf_hub_download(repo_id, "config.json", token="hf_not_a_token")
    assert invalid.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as forbidden:  # public repos are read-only to others
        HfApi(token="hf_other_token").upload_file(
            path_or_fileobj=b"x", path_in_repo="x", repo_id=api.create_repo("open").repo_id
        )
    assert forbidden.value.response.status_code == 403

    assert Path(hf_hub_download(repo_id, "config.json", token=hub.token)).read_bytes() == b"{}"
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the implicit token, read at call time
    assert Path(snapshot_download(repo_id), "config.json").read_bytes() == b"{}"


def test_missing_repo_revision_and_file(hub):
    api = HfApi(token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/nothing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{hub.user}/nothing")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{hub.user}/nothing")

    repo_id = api.create_repo("exists").repo_id
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.safetensors")
    assert not api.file_exists(repo_id, "missing.safetensors")
    assert api.file_exists(repo_id, ".gitattributes")


def test_offline_mode_serves_from_cache(hub, monkeypatch):
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("cached").repo_id
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id=repo_id)
    online_file = hf_hub_download(repo_id, "config.json")
    online_snapshot = snapshot_download(repo_id)
    received = len(hub.requests)

    # constants.HF_HUB_OFFLINE is read from the environment at import, and at call time from here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.is_offline_mode()
    assert hf_hub_download(repo_id, "config.json") == online_file
    assert snapshot_download(repo_id) == online_snapshot
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(repo_id, "never-downloaded.json")
    assert len(hub.requests) == received  # nothing reached the server


def test_offline_environment_variable_in_a_fresh_process(hub):
    api = HfApi(token=hub.token)
    repo_id = api.create_repo("cached").repo_id
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id=repo_id)
    online_file = hf_hub_download(repo_id, "config.json")
    received = len(hub.requests)

    # The `hub` fixture exported this test's HF_HOME and HF_HUB_CACHE, so the child shares the cache.
    script = f"import huggingface_hub as h; print(h.hf_hub_download({repo_id!r}, 'config.json'))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == online_file
    assert len(hub.requests) == received


class TinyNet(torch.nn.Module, PyTorchModelHubMixin, library_name="tinydiff"):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)


def test_model_hub_mixin_round_trip(hub):
    # The path tinydiff's save_pretrained / push_to_hub / from_pretrained will build on.
    model = TinyNet(width=3)
    commit_url = model.push_to_hub(f"{hub.user}/tiny", token=hub.token, private=True)
    assert commit_url.startswith(hub.endpoint)
    files = HfApi(token=hub.token).list_repo_files(f"{hub.user}/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    loaded = TinyNet.from_pretrained(f"{hub.user}/tiny", token=hub.token)
    assert loaded.linear.in_features == 3
    torch.testing.assert_close(loaded.linear.weight, model.linear.weight, rtol=0, atol=0)
