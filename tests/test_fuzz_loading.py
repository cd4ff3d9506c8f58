"""Fuzzing the loaders: randomly corrupted model folders and checkpoints load, or fail with
tinydiff's own errors only, quickly, and never run code from the files."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from _models import mlp_model
from _nets import tiny_diffusers_unet

from tinydiff import DiffusionModel, load_checkpoint, save_checkpoint
from tinydiff.hub import MANIFEST_NAME, ModelNotFoundError, SerializationError

ALLOWED = (SerializationError, ModelNotFoundError)
#: per loader; each case takes milliseconds. TINYDIFF_FUZZ_CASES=5000 for a longer run
CASES = int(os.environ.get("TINYDIFF_FUZZ_CASES", "200"))


class _Payload:
    """Unpickling this writes the marker file: the proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled!",))


def _flip_bits(data: bytes, rng: random.Random, header_bias: bool) -> bytes:
    out = bytearray(data)
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    for _ in range(rng.randint(1, 8)):
        limit = min(len(out), 8 + n) if header_bias and rng.random() < 0.8 else len(out)
        i = rng.randrange(limit)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _edit_header(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one field of one header entry (or the length) with a hostile value."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    field = rng.choice(["dtype", "shape", "data_offsets", "length", "drop", "dup"])
    hostile = [
        -1,
        2**63,
        2**64 + 5,
        1e308,
        None,
        True,
        "F32",
        "I64",
        "Q4",
        [],
        [0],
        [2**63, 0],
        [0, 2**63],
        {"a": 1},
        "x" * 300,
    ]
    if field == "length":
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**63, len(data)])) + data[8:]
    if field == "drop":
        header.pop(key)
    elif field == "dup":
        header[key + "_copy"] = header[key]
    else:
        header[key][field] = rng.choice(hostile)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "flip-header", "truncate", "header", "append"])
    if kind == "flip":
        return _flip_bits(data, rng, header_bias=False)
    if kind == "flip-header":
        return _flip_bits(data, rng, header_bias=True)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return _edit_header(data, rng)


def _mutate_config(text: str, rng: random.Random) -> str:
    doc = json.loads(text)
    hostile = [None, True, -1, 0, 2**31, 10**12, 1.5, "x", [], {}, [1, 2], {"a": 1}]
    for _ in range(rng.randint(1, 3)):
        network = doc.get("network")
        nested = [doc.get("model"), network.get("config") if isinstance(network, dict) else None]
        section = rng.choice([doc, doc] + [d for d in nested if isinstance(d, dict) and d])
        key = rng.choice(sorted(section))
        if rng.random() < 0.2:
            section.pop(key)
        else:
            section[key] = rng.choice(hostile)
    out = json.dumps(doc)
    if rng.random() < 0.2:  # sometimes break the JSON itself
        i = rng.randrange(len(out))
        out = out[:i] + rng.choice(["", "{", "]", '"', "\\", "\x00"]) + out[i + 1 :]
    return out


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("original")
    model = mlp_model(ema=True)
    model.save_pretrained(folder)
    opt = torch.optim.Adam(model.parameters())
    model.loss(torch.randn(4, 2)).mean().backward()
    opt.step()
    save_checkpoint(folder / "ckpt.safetensors", model, opt, step=3)
    names = ("config.json", "model.safetensors", "ema.safetensors", "ckpt.safetensors")
    return {name: (folder / name).read_bytes() for name in (*names, MANIFEST_NAME)}


def _assert_allowed(fn, counts: dict[str, int]) -> None:
    try:
        fn()
        counts["loaded"] += 1
    except ALLOWED:
        counts["refused"] += 1


def test_corrupted_model_folders(tmp_path, originals):
    rng = random.Random(14)
    marker = tmp_path / "marker"
    counts = {"loaded": 0, "refused": 0}
    start = time.perf_counter()
    for i in range(CASES):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for name in ("config.json", "model.safetensors", "ema.safetensors", MANIFEST_NAME):
            (folder / name).write_bytes(originals[name])
        target = rng.choice(
            ["config.json", "model.safetensors", "ema.safetensors", "pickle", MANIFEST_NAME]
        )
        if target == MANIFEST_NAME:  # dropped, or one byte changed
            if rng.random() < 0.3:
                (folder / target).unlink()
            else:
                text = originals[target].decode()
                j = rng.randrange(len(text))
                (folder / target).write_text(text[:j] + rng.choice('0f"{],x') + text[j + 1 :])
        elif target == "config.json":
            (folder / target).write_text(_mutate_config(originals[target].decode(), rng))
        elif target == "pickle":  # weights replaced by a pickle, under each refused name
            (folder / "model.safetensors").unlink()
            name = rng.choice(["pytorch_model.bin", "model.pt", "model.ckpt"])
            (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
        else:
            (folder / target).write_bytes(_mutate(originals[target], rng))
        ema = rng.choice([{}, {"load_ema": True}, {"use_ema_weights": True}])
        _assert_allowed(lambda f=folder, e=ema: DiffusionModel.from_pretrained(f, **e), counts)
    elapsed = time.perf_counter() - start
    assert not marker.exists(), "a pickle was executed"
    assert counts["refused"] > CASES // 2, counts
    assert elapsed < 60 * max(1, CASES // 200), f"{CASES} corrupted folders took {elapsed:.1f} s"


def test_corrupted_checkpoints(tmp_path, originals):
    rng = random.Random(41)
    marker = tmp_path / "marker"
    counts = {"loaded": 0, "refused": 0}
    path = tmp_path / "ckpt.safetensors"
    start = time.perf_counter()
    for _ in range(CASES):
        if rng.random() < 0.1:
            path.write_bytes(pickle.dumps(_Payload(marker)))
        else:
            path.write_bytes(_mutate(originals["ckpt.safetensors"], rng))
        model = mlp_model(ema=True)
        opt = torch.optim.Adam(model.parameters())
        _assert_allowed(lambda m=model, o=opt: load_checkpoint(path, m, o), counts)
    elapsed = time.perf_counter() - start
    assert not marker.exists(), "a pickle was executed"
    assert counts["refused"] > CASES // 2, counts
    assert elapsed < 60 * max(1, CASES // 200), (
        f"{CASES} corrupted checkpoints took {elapsed:.1f} s"
    )


def test_corrupted_folder_saves(tmp_path):
    """A folder save (manifest + save ids) with one file corrupted: the manifest-checked
    readers load it or refuse it with a SerializationError (MixedSaveError included)."""
    from tinydiff._atomic import (
        MANIFEST_NAME,
        FolderWriter,
        open_safetensors_member,
        read_json_member,
        read_manifest,
    )

    source = tmp_path / "source"
    with FolderWriter(source) as save:
        save.write_safetensors("model.safetensors", {"w": torch.randn(16), "b": torch.zeros(2)})
        save.write_json("config.json", {"step": 3, "layers": [1, 2]})
    names = ("model.safetensors", "config.json", MANIFEST_NAME)
    originals = {name: (source / name).read_bytes() for name in names}
    rng = random.Random(20)
    counts = {"loaded": 0, "refused": 0}

    def load(folder: Path) -> None:
        manifest = read_manifest(folder)
        read_json_member(folder, "config.json", manifest)
        with open_safetensors_member(
            folder, "model.safetensors", manifest, max_header_bytes=4096
        ) as f:
            for key in f.entries:
                f.get(key)

    for i in range(CASES // 2):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        for name, data in originals.items():
            (folder / name).write_bytes(data)
        target = rng.choice(names)
        if target == "model.safetensors":
            (folder / target).write_bytes(_mutate(originals[target], rng))
        else:
            text = originals[target].decode()
            j = rng.randrange(len(text))
            edit = rng.choice(["", "0", "f", '"', "{", "]", ",", "x" * 40])
            (folder / target).write_text(text[:j] + edit + text[j + 1 :])
        _assert_allowed(lambda f=folder: load(f), counts)
    assert counts["refused"] > CASES // 8, counts


def _diffusers_originals(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """A tiny UNet2DModel with four scheduler configs (DDPM, DDIM, FlowMatchEuler, EDMEuler)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    schedulers = [
        diffusers.DDPMScheduler(),
        diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        diffusers.EDMEulerScheduler(),
    ]
    unet_files = {
        name: (tmp_path / "unet" / name).read_bytes()
        for name in ("config.json", "diffusion_pytorch_model.safetensors")
    }
    out = {}
    for i, scheduler in enumerate(schedulers):
        scheduler.save_config(tmp_path / f"s{i}")
        config = (tmp_path / f"s{i}" / "scheduler_config.json").read_bytes()
        out[type(scheduler).__name__] = {**unet_files, "scheduler_config.json": config}
    return out


def _mutate_flat(text: str, rng: random.Random) -> tuple[str, set[str]]:
    """Hostile values for 1-3 keys of a flat JSON config; returns the text and the keys."""
    doc = json.loads(text)
    hostile = [None, True, -1, 0, 2**31, 10**12, 1.5, float("nan"), "x", [], {}, [1, 2], {"a": 1}]
    keys = set()
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(doc))
        keys.add(key)
        if rng.random() < 0.15:
            doc.pop(key)
        else:
            doc[key] = rng.choice(hostile)
    out = json.dumps(doc)  # NaN is written as the (refused) literal NaN
    if rng.random() < 0.15:  # sometimes break the JSON itself (a key name may change)
        i = rng.randrange(len(out))
        out = out[:i] + rng.choice(["", "{", "]", '"', "\\", "\x00"]) + out[i + 1 :]
        try:
            keys |= set(json.loads(out))
        except (ValueError, TypeError):
            pass
    if rng.random() < 0.05:  # or nest it deeply
        out = "[" * 50_000 + out + "]" * 50_000
    return out, keys


def test_corrupted_diffusers_configs(tmp_path):
    """from_diffusers on a UNet folder whose config.json or scheduler_config.json has hostile
    values: it loads, or raises tinydiff's own errors (SerializationError,
    UnsupportedSchedulerError), or a ValueError/TypeError that names a changed field."""
    from tinydiff.diffusers_compat import UnsupportedSchedulerError

    originals = _diffusers_originals(tmp_path / "originals")
    rng = random.Random(24)
    counts = {"loaded": 0, "refused": 0, "named": 0}
    start = time.perf_counter()
    for i in range(CASES):
        files = originals[rng.choice(sorted(originals))]
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        target = rng.choice(["config.json", "scheduler_config.json"])
        text, keys = _mutate_flat(files[target].decode(), rng)
        (folder / target).write_text(text)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "options not modelled" warnings
                DiffusionModel.from_diffusers(folder)
            counts["loaded"] += 1
        except (SerializationError, UnsupportedSchedulerError):
            counts["refused"] += 1
        except (ValueError, TypeError) as err:
            assert any(key in str(err) for key in keys), (target, keys, repr(err))
            counts["named"] += 1
        shutil.rmtree(folder)
    elapsed = time.perf_counter() - start
    assert counts["refused"] + counts["named"] > CASES // 3, counts
    assert elapsed < 120 * max(1, CASES // 200), f"{CASES} configs took {elapsed:.1f} s"
