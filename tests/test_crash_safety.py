"""Nothing lost, nothing mixed: crashes at every write point, real SIGKILLs, and concurrent
writers never leave a checkpoint or a saved folder that loads as a mix of two saves.

Children are forked (the parent has imported torch once); a crash is ``os._exit`` just before
the k-th state-changing system call (create, fsync, rename, unlink) of a save. Every outcome
must be the old save, the new one, or a clear library error. Bounded: the whole file runs in
well under 30 s on 2 cores (a longer soak: benchmarks/soak_crash_safety.py).
"""

from __future__ import annotations

import os
import random
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tinydiff import load_checkpoint, save_checkpoint
from tinydiff._atomic import (
    MANIFEST_NAME,
    SAVE_ID_KEY,
    FolderWriter,
    MixedSaveError,
    atomic_write,
    iter_temporaries,
    open_safetensors_member,
    read_json_member,
    read_manifest,
)
from tinydiff._safetensors import SafetensorsFile, SerializationError
from tinydiff.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

_PATCHED = ("open", "fsync", "replace", "unlink")


def _fork(fn: Any) -> int:
    """Run ``fn()`` in a forked child; returns its pid (the child never returns)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _crash_at(k: int) -> None:
    """In a child: ``os._exit(17)`` just before the k-th create / fsync / rename / unlink."""
    count = [0]

    def wrap(name: str) -> Any:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or (len(args) > 1 and args[1] & os.O_CREAT):
                count[0] += 1
                if count[0] == k:
                    os._exit(17)
            return real(*args, **kwargs)

        return call

    for name in _PATCHED:
        setattr(os, name, wrap(name))


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- a checkpoint -----------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(64))
        self.b = nn.Parameter(torch.zeros(3))


def _net_at(step: int) -> _Net:
    net = _Net()
    with torch.no_grad():
        net.w.fill_(step)
        net.b.fill_(step)
    return net


def _load_step(path: Path) -> int:
    """The checkpoint's step, checked to be the step its weights encode."""
    net = _Net()
    step = load_checkpoint(path, net, restore_rng=False)
    assert net.w.eq(step).all() and net.b.eq(step).all(), f"mixed: step {step}, {net.w[0]}"
    return step


def test_checkpoint_crash_at_every_write_point(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _net_at(1), step=1)
    outcomes: dict[str, int] = {}
    for k in range(1, 50):
        pid = _fork(lambda k=k: (_crash_at(k), save_checkpoint(path, _net_at(2), step=2)))
        code = _wait(pid)
        step = _load_step(path)
        assert step in (1, 2)
        outcomes[f"step {step}"] = outcomes.get(f"step {step}", 0) + 1
        if code == 0:
            break
        assert code == 17
        save_checkpoint(path, _net_at(1), step=1)  # back to the old one; cleans temporaries
        assert not list(iter_temporaries(tmp_path)) and len(os.listdir(tmp_path)) == 1
    else:
        pytest.fail("the save never completed")
    assert k >= 4, outcomes  # create, fsync, rename, directory fsync at least


def _replace_when_data_is_mapped(monkeypatch, new: Path, path: Path) -> None:
    """Another process saves right between the header read and the tensor data's mapping
    (safetensors reads the header, then maps the data by name with ``from_file``)."""
    real = torch.UntypedStorage.from_file

    def from_file(*args: Any, **kwargs: Any) -> Any:
        if new.exists():
            os.replace(new, path)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", from_file)


def test_checkpoint_is_read_from_one_open_file(tmp_path: Path, monkeypatch) -> None:
    """Replacing the file between the header and the tensors cannot mix two versions."""
    path, new = tmp_path / "c.safetensors", tmp_path / "o.safetensors"
    save_checkpoint(path, _net_at(1), step=1)
    save_checkpoint(new, _net_at(2), step=2)
    _replace_when_data_is_mapped(monkeypatch, new, path)
    assert _load_step(path) == 1  # the version whose header was read, weights included
    assert not new.exists() and read_checkpoint(path)["step"] == 2


def test_safetensors_file_keeps_its_version(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    path, new = tmp_path / "w.safetensors", tmp_path / "new"
    save_file({"a": torch.zeros(4)}, str(path), metadata={"v": "old"})
    save_file({"a": torch.ones(4)}, str(new), metadata={"v": "new"})
    _replace_when_data_is_mapped(monkeypatch, new, path)
    with SafetensorsFile(path, max_header_bytes=1 << 16) as f:
        assert f.metadata["v"] == "old" and f.get("a").eq(0).all()
    assert not new.exists()


def _writer_loop(path: Path, parity: int, stop: Path) -> None:  # pragma: no cover - child
    end, step = time.monotonic() + 60.0, parity
    while time.monotonic() < end and not stop.exists():
        save_checkpoint(path, _net_at(step), step=step, save_rng=False)
        step += 2


def test_two_writers_and_a_reader_never_mix(tmp_path: Path) -> None:
    """Counts, not a time budget (a loaded CI host): at least 30 loads, until three different
    saves were seen."""
    path, stop = tmp_path / "ckpt.safetensors", tmp_path / "stop"
    save_checkpoint(path, _net_at(0), step=0)
    writers = [_fork(lambda p=p: _writer_loop(path, p, stop)) for p in (1, 2)]
    loads, seen, deadline = 0, set(), time.monotonic() + 50.0
    try:
        while (loads < 30 or len(seen) < 3) and time.monotonic() < deadline:
            seen.add(_load_step(path))  # asserts that the step and the weights agree
            loads += 1
    finally:
        stop.touch()
        assert [_wait(pid) for pid in writers] == [0, 0]
    assert loads >= 30 and len(seen) >= 3, (loads, seen)
    stop.unlink()
    assert not list(iter_temporaries(tmp_path))


def test_sigkill_while_saving_a_checkpoint(tmp_path: Path) -> None:
    """Real SIGKILLs at random moments of a loop of saves: old or new, never torn."""
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, _net_at(0), step=0)
    rng = random.Random(0)
    for kill in range(6):
        pid = _fork(lambda kill=kill: _writer_loop(path, 1 + kill * 1000, tmp_path / "never"))
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        _load_step(path)
    save_checkpoint(path, _net_at(0), step=0)  # the next save removes the killed ones' files
    assert not list(iter_temporaries(tmp_path))


def test_files_get_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.safetensors", _net_at(1), step=1)
        atomic_write(tmp_path / "a.json", b"{}")
        with FolderWriter(tmp_path / "f") as save:
            save.write_safetensors("model.safetensors", {"w": torch.zeros(2)})
            save.write_json("config.json", {})
        os.umask(0o077)
        atomic_write(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    for name in (
        "c.safetensors",
        "a.json",
        "f/model.safetensors",
        "f/config.json",
        "f/" + MANIFEST_NAME,
    ):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600


# -- a folder ---------------------------------------------------------------------------------
def _save_folder(folder: Path, step: int, ema: bool = True) -> None:
    with FolderWriter(folder) as save:
        save.write_safetensors("model.safetensors", {"w": torch.full((32,), float(step))})
        if ema:
            save.write_safetensors("ema.safetensors", {"w": torch.full((32,), step + 0.5)})
        save.write_json("config.json", {"step": step, "ema": ema})
        save.write_bytes("README.md", f"step {step}\n".encode())


def _load_folder(folder: Path) -> tuple[int, bool]:
    """What a manifest-aware from_pretrained does; asserts that nothing is mixed."""
    manifest = read_manifest(folder)
    config = read_json_member(folder, "config.json", manifest)
    step = config["step"]
    with open_safetensors_member(folder, "model.safetensors", manifest, max_header_bytes=4096) as f:
        assert f.get("w").eq(step).all(), f"mixed: config step {step}, weights {f.get('w')[0]}"
    if config["ema"]:
        with open_safetensors_member(
            folder, "ema.safetensors", manifest, max_header_bytes=4096
        ) as f:
            assert f.get("w").eq(step + 0.5).all()
    return step, config["ema"]


def test_folder_round_trip_and_what_it_writes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    _save_folder(tmp_path, 1)
    assert _load_folder(tmp_path) == (1, True)
    manifest = read_manifest(tmp_path)
    assert manifest is not None and set(manifest.files) == {
        "model.safetensors",
        "ema.safetensors",
        "config.json",
        "README.md",
    }
    _save_folder(tmp_path, 2, ema=False)  # the EMA file of the old save goes, after the commit
    assert _load_folder(tmp_path) == (2, False)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "notes.txt",
        MANIFEST_NAME,
    ]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # never touched


def test_folder_mix_is_a_clear_error(tmp_path: Path) -> None:
    _save_folder(tmp_path / "a", 1)
    _save_folder(tmp_path / "b", 2)
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(MixedSaveError, match="mixes files of two saves"):
        _load_folder(tmp_path / "a")
    # a save id without a manifest: an interrupted first save
    os.unlink(tmp_path / "b" / MANIFEST_NAME)
    with pytest.raises(MixedSaveError, match="did not finish"):
        _load_folder(tmp_path / "b")
    # a folder from before manifests: files without save ids load as before
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text('{"step": 3, "ema": false}')
    from safetensors.torch import save_file

    save_file({"w": torch.full((32,), 3.0)}, str(legacy / "model.safetensors"))
    assert _load_folder(legacy) == (3, False)


def test_folder_crash_at_every_write_point(tmp_path: Path) -> None:
    _save_folder(tmp_path, 1, ema=True)
    (tmp_path / "notes.txt").write_text("mine")
    outcomes: dict[str, int] = {}
    for k in range(1, 80):
        pid = _fork(lambda k=k: (_crash_at(k), _save_folder(tmp_path, 2, ema=False)))
        code = _wait(pid)
        try:
            step, ema = _load_folder(tmp_path)
            assert (step, ema) in ((1, True), (2, False))
            outcome = f"step {step}"
        except MixedSaveError:
            outcome = "MixedSaveError"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if code == 0:
            break
        assert code == 17
        _save_folder(tmp_path, 1, ema=True)  # the next save cleans up after the crash
        assert _load_folder(tmp_path) == (1, True)
        assert not list(iter_temporaries(tmp_path))
    else:
        pytest.fail("the save never completed")
    assert k > 12 and set(outcomes) == {"step 1", "step 2", "MixedSaveError"}, outcomes
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _folder_writer(folder: Path, parity: int, stop: Path) -> None:  # pragma: no cover
    end, step = time.monotonic() + 60.0, parity
    while time.monotonic() < end and not stop.exists():
        _save_folder(folder, step, ema=step % 4 < 2)
        step += 2


def test_folder_two_writers_and_a_reader(tmp_path: Path) -> None:
    """Counts, not a time budget (a loaded CI host): at least 15 whole loads."""
    folder, stop = tmp_path / "folder", tmp_path / "stop"
    folder.mkdir()
    _save_folder(folder, 0)
    writers = [_fork(lambda p=p: _folder_writer(folder, p, stop)) for p in (1, 2)]
    loads = retries = 0
    deadline = time.monotonic() + 50.0
    try:
        while loads < 15 and time.monotonic() < deadline:
            try:
                _load_folder(folder)  # asserts: never a mix
                loads += 1
            except (MixedSaveError, FileNotFoundError):  # changed while read: retry
                retries += 1
    finally:
        stop.touch()
        assert [_wait(pid) for pid in writers] == [0, 0]
    assert loads >= 15, (loads, retries)


def test_foreign_and_live_temporaries_are_kept(tmp_path: Path) -> None:
    from tinydiff._atomic import _host_tag

    live = tmp_path / f".model.safetensors.{_host_tag()}-{os.getppid()}-0123abcd.tinydiff-tmp"
    dead_pid = _fork(lambda: None)
    _wait(dead_pid)
    dead = tmp_path / f".model.safetensors.{_host_tag()}-{dead_pid}-0123abcd.tinydiff-tmp"
    other = tmp_path / ".model.safetensors.notmine.tmp"
    for p in (live, dead, other):
        p.write_bytes(b"x")
    _save_folder(tmp_path, 1)
    assert live.exists() and other.exists() and not dead.exists()


def test_copy_file_restreams_with_the_save_id(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7)}
    save_file(tensors, str(src / "w.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text('{"_class_name": "UNet2DModel", "x": 1}')
    with FolderWriter(tmp_path / "out") as save:
        save.copy_file("unet/diffusion_pytorch_model.safetensors", src / "w.safetensors")
        save.copy_file("unet/config.json", src / "config.json")
        save_id = save.save_id
    out = tmp_path / "out"
    manifest = read_manifest(out)
    name = "unet/diffusion_pytorch_model.safetensors"
    with open_safetensors_member(out, name, manifest, max_header_bytes=4096) as f:
        assert f.metadata == {"format": "pt", SAVE_ID_KEY: save_id}
        for key, value in tensors.items():
            assert torch.equal(f.get(key), value)
    assert read_json_member(out, "unet/config.json", manifest) == {
        "_class_name": "UNet2DModel",
        "x": 1,
    }


@pytest.mark.parametrize(
    "doc",
    [
        "[]",
        '{"format": "tinydiff-save", "version": 1, "save_id": "x", "files": {}}',
        '{"format": "tinydiff-save", "version": 9, "save_id": "' + "0" * 32 + '", "files": {}}',
        '{"format": "tinydiff-save", "version": 1, "save_id": "'
        + "0" * 32
        + '", "files": {"../x": "json"}}',
        '{"format": "tinydiff-save", "version": 1, "save_id": "'
        + "0" * 32
        + '", "files": {"a": "pickle"}}',
        '{"format": "tinydiff-save", "format": "tinydiff-save"}',
    ],
)
def test_malformed_manifest(tmp_path: Path, doc: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(doc)
    with pytest.raises(SerializationError):
        read_manifest(tmp_path)


def test_writer_refuses_bad_names_and_targets(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        FolderWriter(tmp_path / "file")
    with FolderWriter(tmp_path / "ok") as save:
        for bad in ("../escape", "/abs", "a//b", MANIFEST_NAME, ""):
            with pytest.raises(ValueError):
                save.write_bytes(bad, b"")
    with pytest.raises(RuntimeError), FolderWriter(tmp_path / "aborted") as save:
        save.write_bytes("README.md", b"x")
        raise RuntimeError("a failure mid-save")
    assert not (tmp_path / "aborted" / "README.md").exists()
    assert not list(iter_temporaries(tmp_path))


def test_trainer_checkpoint_crash_at_every_write_point(tmp_path: Path) -> None:
    from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = DiffusionModel(_TimeFree(), DiffusionModelConfig(input_shape=(2,)))
        model.enable_ema(0.9)
        x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
        return Trainer(
            model, x, batch_size=8, progress=False, checkpoint_path=path, checkpoint_every=2
        )

    path = tmp_path / "run.safetensors"
    first = trainer()
    first.fit(2)
    outcomes: dict[int, int] = {}
    for k in range(1, 50):
        pid = _fork(lambda k=k: (_crash_at(k), first.fit(4)))
        code = _wait(pid)
        fresh = trainer()
        step = fresh.resume(path)
        assert step in (2, 4) and len(fresh.history) == step
        outcomes[step] = outcomes.get(step, 0) + 1
        if code == 0:
            break
        assert code == 17
    else:
        pytest.fail("the save never completed")
    assert outcomes.get(2, 0) >= 3 and outcomes[4] >= 1, outcomes


class _TimeFree(nn.Module):
    """net(x, t) -> x W: a network that ignores t (enough to train and checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


# -- save_pretrained ---------------------------------------------------------------------------
def _pretrained_at(step: int, ema: bool) -> Any:
    """A small model whose weights are all ``step`` and whose config carries ``step`` too
    (min_snr_gamma = step + 1), with an EMA (weights ``step + 0.5``) or without."""
    from tinydiff import DiffusionModel
    from tinydiff.nn import MLP

    net = MLP(2, hidden_dim=8, num_layers=1)
    model = DiffusionModel(net, input_shape=(2,), min_snr_gamma=float(step + 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
        if ema:
            model.enable_ema(0.9)
            for p in model.ema.module.parameters():
                p.fill_(step + 0.5)
    return model


def _load_pretrained(folder: Path) -> tuple[int, bool]:
    """from_pretrained with its defaults; asserts that config, weights and EMA agree."""
    from tinydiff import DiffusionModel

    model = DiffusionModel.from_pretrained(folder)
    step = round(model.config.min_snr_gamma) - 1
    assert all(p.eq(step).all() for p in model.parameters()), f"mixed: config step {step}"
    if model.ema is not None:
        assert all(p.eq(step + 0.5).all() for p in model.ema.module.parameters()), "mixed EMA"
    return step, model.ema is not None


def test_save_pretrained_crash_at_every_write_point(tmp_path: Path) -> None:
    """os._exit before every create / fsync / rename / unlink of a save_pretrained that
    replaces a model with EMA by one without: old, new or MixedSaveError, never a mix."""
    old, new = _pretrained_at(1, ema=True), _pretrained_at(2, ema=False)
    old.save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    outcomes: dict[str, int] = {}
    for k in range(1, 80):
        pid = _fork(lambda k=k: (_crash_at(k), new.save_pretrained(tmp_path)))
        code = _wait(pid)
        try:
            got = _load_pretrained(tmp_path)
            assert got in ((1, True), (2, False)), got
            outcome = f"step {got[0]}"
        except MixedSaveError:
            outcome = "MixedSaveError"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if code == 0:
            break
        assert code == 17
        old.save_pretrained(tmp_path)  # the next save cleans up after the crash
        assert _load_pretrained(tmp_path) == (1, True)
        assert not list(iter_temporaries(tmp_path))
    else:
        pytest.fail("the save never completed")
    assert k > 12 and set(outcomes) == {"step 1", "step 2", "MixedSaveError"}, outcomes
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "ema.safetensors").exists()  # the new save has none


def test_save_pretrained_over_a_folder_without_manifest(tmp_path: Path) -> None:
    """A crash in the first save over a folder saved before manifests existed (tinydiff 0.2:
    the same files without save ids, schema 2): the old model, the new one, or
    MixedSaveError; and the 0.2 folder itself loads."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    legacy, folder = tmp_path / "legacy", tmp_path / "folder"
    _pretrained_at(1, ema=True).save_pretrained(legacy)
    os.unlink(legacy / MANIFEST_NAME)
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(load_file(legacy / name), str(legacy / name))  # no metadata: no save id
    doc = json.loads((legacy / "config.json").read_text())
    del doc[SAVE_ID_KEY]
    (legacy / "config.json").write_text(json.dumps({**doc, "schema_version": 2}))
    assert _load_pretrained(legacy) == (1, True)
    new = _pretrained_at(2, ema=False)
    outcomes: set[str] = set()
    for k in range(1, 80, 2):  # every other write point: the full sweep is the test above
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(legacy, folder)
        code = _wait(_fork(lambda k=k: (_crash_at(k), new.save_pretrained(folder))))
        try:
            got = _load_pretrained(folder)
            assert got in ((1, True), (2, False)), got
            outcomes.add(f"step {got[0]}")
        except MixedSaveError:
            outcomes.add("MixedSaveError")
        if code == 0:
            break
    assert outcomes == {"step 1", "step 2", "MixedSaveError"}, outcomes


def _pretrained_writer(folder: Path, parity: int, stop: Path) -> None:  # pragma: no cover
    end, step = time.monotonic() + 60.0, parity
    while time.monotonic() < end and not stop.exists():
        _pretrained_at(step, ema=step % 4 < 2).save_pretrained(folder)
        step += 2


def test_save_pretrained_two_writers_and_a_reader(tmp_path: Path) -> None:
    """Two processes save_pretrained into one folder while this one loads it (at least 30
    times, and until it has seen three different saves): every load is one whole save, and
    none fails. Counts, not a time budget: a loaded CI host still interleaves the loads with
    the writers' commits."""
    folder, stop = tmp_path / "model", tmp_path / "stop"
    _pretrained_at(0, ema=True).save_pretrained(folder)
    writers = [_fork(lambda p=p: _pretrained_writer(folder, p, stop)) for p in (1, 2)]
    loads = errors = 0
    seen = set()
    deadline = time.monotonic() + 50.0
    try:
        while (loads + errors < 30 or len(seen) < 3) and time.monotonic() < deadline:
            try:
                seen.add(_load_pretrained(folder)[0])  # asserts: never a mix
                loads += 1
            except MixedSaveError:  # still changing after the retries: a clear error
                errors += 1
    finally:
        stop.touch()
        assert [_wait(pid) for pid in writers] == [0, 0]
    # commits hold an exclusive flock of the folder and loads a shared one: no retry needed
    assert loads >= 30 and errors == 0, (loads, errors)
    assert len(seen) >= 3, seen  # the loads saw both writers' commits, not only the first save
    assert _load_pretrained(folder)[0] >= 1  # the last commit left one whole save
