"""Hostile and careless input (issue 14): every item gets the library's own error, raised
before any state changes, with a message that names what was wrong."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _models import draw, mlp_model
from _nets import TinyNet
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from tinydiff import DiffusionModel, DiffusionModelConfig, load_checkpoint, save_checkpoint
from tinydiff.checkpoint import read_checkpoint
from tinydiff.cli import main
from tinydiff.hub import (
    PLAIN_SCHEMA_VERSION,
    SCHEMA_VERSION,
    ModelNotFoundError,
    SerializationError,
)
from tinydiff.nn import MLP, UNet

SRC = Path(__file__).resolve().parents[1] / "src"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _in_thread(fn, timeout: float = 20.0) -> BaseException | None:
    """Run fn; fail the test (instead of hanging) if it blocks. Returns what it raised."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            result.append(None)
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} blocked for more than {timeout} s"
    return result[0]


# -- 1. files that are not regular files ---------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ckpt.safetensors"
    os.mkfifo(fifo)
    model = mlp_model()
    err = _in_thread(lambda: load_checkpoint(fifo, model))
    assert isinstance(err, SerializationError) and "FIFO" in str(err)

    folder = tmp_path / "model"
    mlp_model().save_pretrained(folder)
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
        os.mkfifo(folder / name)
        err = _in_thread(lambda: DiffusionModel.from_pretrained(folder))
        assert isinstance(err, SerializationError), err
        assert f"{name} {folder / name} is a FIFO" in str(err)
        (folder / name).unlink()
        mlp_model().save_pretrained(folder)


def test_directory_and_device_are_refused(tmp_path):
    model = mlp_model()
    with pytest.raises(SerializationError, match="is a directory, not a regular file"):
        load_checkpoint(tmp_path, model)
    if os.path.exists("/dev/urandom"):
        with pytest.raises(SerializationError, match="character device"):
            load_checkpoint("/dev/urandom", model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors", model)


# -- 2. memory bombs in config.json, under a resource limit --------------------------------------
_BOMB_SCRIPT = r"""
import json, resource, sys, time
import torch
from tinydiff import DiffusionModel
from tinydiff.hub import SerializationError

vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more
for folder in sys.argv[1:]:
    start = time.perf_counter()
    try:
        DiffusionModel.from_pretrained(folder)
        print(json.dumps(["loaded", folder]))
    except SerializationError as err:
        print(json.dumps(["SerializationError", str(err)[:400], time.perf_counter() - start]))
    except BaseException as err:
        print(json.dumps([type(err).__name__, str(err)[:400]]))
"""


def test_config_memory_bombs_fail_before_allocating(tmp_path):
    mlp_model().save_pretrained(tmp_path / "mlp")
    from _models import unet_model

    unet_model().save_pretrained(tmp_path / "unet")
    cases = {
        # the issue's values: refused by the constructors' bounds
        "hidden-1e9": ("mlp", {"hidden_dim": 10**9}, "hidden_dim in 1..16777216"),
        "time-1e12": ("mlp", {"time_embed_dim": 10**12}, "time_embed_dim in 2..16777216"),
        "classes-1e12": ("mlp", {"num_classes": 10**12}, "num_classes in 1..16777216"),
        "layers-1e7": ("mlp", {"num_layers": 10**7}, "num_layers in 1..1024"),
        "unet-base-1e9": ("unet", {"base_channels": 10**9}, "base_channels in 2..16777216"),
        # the largest allowed sizes: built on the meta device, refused against the header
        "hidden-max": ("mlp", {"hidden_dim": 2**24}, "does not match the model"),
        "classes-max": ("mlp", {"num_classes": 2**24}, "does not match the model"),
        "layers-max": ("mlp", {"num_layers": 1024}, "does not match the model"),
        "unet-base-max": ("unet", {"base_channels": 2**20}, "does not match the model"),
    }
    folders = []
    for name, (base, edit, _) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / base).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        doc = json.loads((folder / "config.json").read_text())
        doc["network"]["config"].update(edit)
        (folder / "config.json").write_text(json.dumps(doc))
        folders.append(str(folder))
    result = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, *folders],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=240,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(cases), result.stderr[-2000:]
    for (name, (_, _, match)), line in zip(cases.items(), lines, strict=True):
        assert line[0] == "SerializationError", (name, line)
        assert match in line[1], (name, line)
        assert line[2] < 30, (name, line)


# -- 3. and 4. load_checkpoint: atomic, validated --------------------------------------------
def _ckpt(tmp_path: Path, **kwargs) -> tuple[Path, DiffusionModel]:
    model = mlp_model(ema=True)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, step=7, **kwargs)
    return path, model


def _with_meta(path: Path, out: Path, edit=None, raw: str | None = None) -> Path:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["tinydiff"])
    if edit is not None:
        edit(meta)
    out.write_bytes(st_save(st_load(data), metadata={"tinydiff": raw or json.dumps(meta)}))
    return out


def _fresh_target() -> tuple[DiffusionModel, torch.optim.Optimizer]:
    model = mlp_model(ema=False)
    with torch.no_grad():
        model.nn_module.output.bias.add_(5.0)
    return model, torch.optim.Adam(model.parameters())


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    gen = torch.Generator().manual_seed(3)
    path, _ = _ckpt(tmp_path, generators={"g": gen})
    target, opt = _fresh_target()
    before = _state(target)
    with pytest.raises(SerializationError, match="EMA mismatch.*enable_ema"):
        load_checkpoint(path, target)  # the file has an EMA, the target none
    assert _same(before, _state(target))
    target.enable_ema(0.5)
    ema_before = {k: v.clone() for k, v in target.ema_state_dict().items()}
    with pytest.raises(SerializationError, match="no generator named 'other'.*it has: g"):
        load_checkpoint(path, target, generators={"other": torch.Generator()})
    with pytest.raises(SerializationError, match="holds no optimizer state"):
        load_checkpoint(path, target, opt)
    rng = torch.get_rng_state()
    assert _same(before, _state(target))
    assert _same(ema_before, target.ema_state_dict())
    assert torch.equal(rng, torch.get_rng_state())
    assert load_checkpoint(path, target, generators={"g": torch.Generator()}) == 7


def test_optimizer_of_another_shape_is_refused_before_any_change(tmp_path):
    model = mlp_model()
    opt = torch.optim.Adam(model.parameters())
    model.loss(torch.randn(4, 2)).mean().backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt)
    target = mlp_model()
    with torch.no_grad():
        target.nn_module.output.bias.add_(5.0)
    before = _state(target)
    wrong = torch.optim.Adam([{"params": list(target.parameters())[:2]}, {"params": []}])
    with pytest.raises(SerializationError, match="parameter groups of sizes"):
        load_checkpoint(path, target, wrong)
    assert _same(before, _state(target))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("step"), "missing fields: \\['step'\\]"),
        (lambda m: m.update(step=-5), "step must be an int"),
        (lambda m: m.update(step=7.9), "step must be an int"),
        (lambda m: m.update(step=True), "step must be an int"),
        (lambda m: m.update(format_version=9), "newer than this tinydiff"),
        (lambda m: m.update(has_ema="yes"), "has_ema must be true or false"),
        (lambda m: m.update(extra=[1, 2]), "extra must be an object"),
        (lambda m: m.update(optimizer={"a": {"__tensor__": "nope/0"}}), "does not hold"),
        (lambda m: m.update(optimizer={"a": {"__items__": [[1]]}}), "malformed dict item"),
        (lambda m: m.update(optimizer={"a": {"__items__": [[[1], 2]]}}), "not hashable"),
        (lambda m: m.update(surprise=1), "unknown fields: \\['surprise'\\]"),
    ],
    ids=[
        "no-step",
        "negative",
        "float",
        "bool",
        "newer",
        "has-ema",
        "extra-list",
        "dangling",
        "items",
        "unhashable",
        "unknown",
    ],
)
def test_malformed_checkpoint_metadata(tmp_path, edit, match):
    path, _ = _ckpt(tmp_path)
    bad = _with_meta(path, tmp_path / "bad.safetensors", edit)
    target = mlp_model(ema=True)
    opt = torch.optim.Adam(target.parameters())
    before = _state(target)
    with pytest.raises(SerializationError, match=match):
        load_checkpoint(bad, target, opt)
    assert _same(before, _state(target))
    with pytest.raises(SerializationError, match=match):
        read_checkpoint(bad)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"step": 1e400}', "overflows a float"),
        ('{"step": NaN}', "NaN and Infinity are refused"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[" * 100 + "]" * 100, "nested too deeply"),
        ('{"step": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
    ids=["json", "overflow", "nan", "recursion", "deep", "long-int"],
)
def test_metadata_that_is_not_sane_json(tmp_path, raw, match):
    path, _ = _ckpt(tmp_path)
    bad = _with_meta(path, tmp_path / "bad.safetensors", raw=raw)
    with pytest.raises(SerializationError, match=match):
        load_checkpoint(bad, mlp_model(ema=True))


def test_checkpoint_tensors_are_checked(tmp_path):
    path, _ = _ckpt(tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = st_load(data)

    def write(change) -> Path:
        t = dict(tensors)
        change(t)
        out = tmp_path / "t.safetensors"
        out.write_bytes(st_save(t, metadata=meta))
        return out

    target = mlp_model(ema=True)
    before = _state(target)
    cases = [
        (
            lambda t: t.update({k: v.long() for k, v in t.items() if k.startswith("model/")}),
            "dtype torch.int64 in the file, torch.float32 expected",
        ),
        (
            lambda t: t.update({"ema/n_averaged": torch.tensor(-3)}),
            "n_averaged must be an integer >= 1",
        ),
        (
            lambda t: t.update({"ema/num_calls": torch.tensor([1.5])}),
            "num_calls: shape \\(1,\\) in the file, \\(\\) expected",
        ),
        (lambda t: t.pop("model/nn_module.output.bias"), "missing keys: nn_module.output.bias"),
        (
            lambda t: t.update({"model/nn_module.output.bias": torch.zeros(3)}),
            "shape \\(3,\\) in the file",
        ),
        (lambda t: t.update({"rng/torch": torch.zeros(3, dtype=torch.uint8)}), "torch RNG state"),
    ]
    for change, match in cases:
        with pytest.raises(SerializationError, match=match):
            load_checkpoint(write(change), target)
        assert _same(before, _state(target))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(SerializationError, match="not a valid safetensors file"):
        load_checkpoint(corrupt, target)
    assert _same(before, _state(target))


def test_float_precision_may_change_on_resume(tmp_path):
    path, model = _ckpt(tmp_path)
    target = mlp_model(ema=True).double()
    assert load_checkpoint(path, target) == 7
    assert torch.equal(target.nn_module.output.bias, model.nn_module.output.bias.double())


# -- 5. from_pretrained: hostile headers and configs -------------------------------------------
def _header_file(path: Path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_deeply_nested_config_json(tmp_path):
    mlp_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(SerializationError, match="nested too deeply"):
        DiffusionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "header",
    [
        b'{"a": ' * 20_000 + b"1" + b"}" * 20_000,
        {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
        {"w": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}},
        {"nn_module.output.bias": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}},
    ],
    ids=["nested", "dtype-list", "dtype-dict", "shape-2**63"],
)
def test_hostile_weights_header(tmp_path, header):
    mlp_model().save_pretrained(tmp_path)
    _header_file(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(SerializationError, match="model.safetensors"):
        DiffusionModel.from_pretrained(tmp_path)


def test_many_empty_tensors_are_refused_from_the_length_alone(tmp_path):
    mlp_model().save_pretrained(tmp_path)
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header = {f"t{i}": entry for i in range(300_000)}
    _header_file(tmp_path / "model.safetensors", header)
    start = time.perf_counter()
    with pytest.raises(SerializationError, match="header claims .* bytes, more than"):
        DiffusionModel.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 2.0


def test_schema_versions(tmp_path):
    model = mlp_model()
    model.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["schema_version"] == PLAIN_SCHEMA_VERSION == 3 and SCHEMA_VERSION == 4
    # a file written the 0.1 way: schema 1, with sigma_type
    doc["schema_version"] = 1
    assert "sigma_type" in doc["model"] or "variance_type" in doc["model"]
    doc["model"]["sigma_type"] = doc["model"].pop("variance_type", doc["model"].get("sigma_type"))
    (tmp_path / "config.json").write_text(json.dumps(doc))
    assert torch.equal(draw(DiffusionModel.from_pretrained(tmp_path)), draw(model))
    for bad in (0, -7):
        doc["schema_version"] = bad
        (tmp_path / "config.json").write_text(json.dumps(doc))
        with pytest.raises(SerializationError, match="config files start at 1"):
            DiffusionModel.from_pretrained(tmp_path)


def test_hub_methods_come_from_the_mixin():
    from tinydiff.hub import HubMixin

    assert issubclass(DiffusionModel, HubMixin)
    for name in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert name not in vars(DiffusionModel) and name in vars(HubMixin)


# -- 6. loss(t=...) --------------------------------------------------------------------------
def _model() -> DiffusionModel:
    return DiffusionModel(MLP(2, 16, 1), DiffusionModelConfig(input_shape=(2,), num_timesteps=50))


@pytest.mark.parametrize("t", [0, -1, -51, 51], ids=["zero", "minus-one", "minus-T-1", "T+1"])
def test_loss_times_out_of_range(t):
    with pytest.raises(ValueError, match=r"t must be integer times in 1\.\.50.*got values in"):
        _model().loss(torch.randn(3, 2), t=torch.full((3,), t))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_loss_times_as_masks_are_refused(dtype):
    with pytest.raises(TypeError, match="index as masks"):
        _model().loss(torch.randn(3, 2), t=torch.ones(3, dtype=dtype))


def test_loss_times_as_python_values():
    model = _model()
    x, noise = torch.randn(3, 2), torch.randn(3, 2)
    want = model.loss(x, t=torch.tensor([5, 5, 5]), noise=noise)
    assert torch.equal(model.loss(x, t=5, noise=noise), want)
    assert torch.equal(model.loss(x, t=[5, 5, 5], noise=noise), want)
    with pytest.raises(TypeError, match="got a bool"):
        model.loss(x, t=True)
    with pytest.raises(TypeError, match="got a list holding"):
        model.loss(x, t=[5, 5.5, 5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_loss_input_dtype_must_match_the_network(dtype):
    with pytest.raises(
        TypeError,
        match=rf"x has dtype {dtype} but the network's parameters are torch.float32: cast",
    ):
        _model().loss(torch.randn(3, 2, dtype=dtype))


# -- 7. non-finite values -----------------------------------------------------------------------
def test_sampler_options_that_make_nan():
    model = _model()
    with pytest.raises(ValueError, match="ddim eta must be a finite number"):
        model.sample(2, 5, sampler="ddim", sampler_kwargs={"eta": float("inf")})
    with pytest.raises(TypeError, match="ddim eta must be a real number, got True"):
        model.sample(2, 5, sampler="ddim", sampler_kwargs={"eta": True})
    with pytest.raises(ValueError, match="heun s_noise must be a finite number"):
        model.sample(2, 5, sampler="heun", sampler_kwargs={"s_noise": float("inf")})
    with pytest.raises(TypeError, match="heun s_churn must be a real number"):
        model.sample(2, 5, sampler="heun", sampler_kwargs={"s_churn": False})
    with pytest.raises(ValueError, match="dpmpp_2m_sde eta must be a finite"):
        model.sample(2, 5, sampler="dpmpp_2m_sde", sampler_kwargs={"eta": float("nan")})
    model.sample(2, 5, sampler="heun", sampler_kwargs={"s_tmax": float("inf")})  # the default


def test_non_finite_inputs_are_named():
    model = _model()
    x = torch.randn(3, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^x holds non-finite values \(1 NaN, 0 inf of 6\)"):
        model.loss(x)
    assert model.loss(x, check_finite=False).isnan().any()
    noise = torch.randn(3, 2)
    noise[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^noise holds non-finite values \(0 NaN, 1 inf"):
        model.loss(torch.randn(3, 2), noise=noise)
    with pytest.raises(ValueError, match="^init_noise holds non-finite"):
        model.sample(3, 5, init_noise=noise)


def test_non_finite_samples_name_the_step():
    model = _model()
    with torch.no_grad():
        model.nn_module.output.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="in the final samples .*return_trajectory=True"):
        model.sample(2, 5, sampler="ddim")
    with pytest.raises(ValueError, match="first after sampling step 1"):
        model.sample(2, 5, sampler="ddim", return_trajectory=True)
    assert model.sample(2, 5, sampler="ddim", check_finite=False).isnan().all()


# -- 8. revisions ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "revision", ["../../../x", "/abs", "main/", "a//b", "v1..2", "x.lock", "a\\b", "", "m\x00"]
)
def test_bad_revision_never_reaches_the_cache(tmp_path, revision):
    with pytest.raises(ValueError, match="is not a valid branch, tag or commit name"):
        DiffusionModel.from_pretrained("user/repo", revision=revision, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(TypeError, match="revision must be a str"):
        DiffusionModel.from_pretrained("user/repo", revision=3)  # type: ignore[arg-type]


def test_crafted_cache_ref_is_refused(tmp_path):
    storage = tmp_path / "models--user--repo"
    (storage / "refs").mkdir(parents=True)
    (storage / "snapshots").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mlp_model().save_pretrained(elsewhere)
    (storage / "refs" / "main").write_text("../../elsewhere")
    with pytest.raises(ModelNotFoundError, match="cache entry .* is corrupt.*delete"):
        DiffusionModel.from_pretrained("user/repo", cache_dir=tmp_path, local_files_only=True)


# -- 9. the command line ------------------------------------------------------------------------
def test_cli_checks_paths_and_numbers_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "taken" / "samples.png").mkdir(parents=True)
    cases = [
        (["--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["--out", str(tmp_path / "taken")], "samples.png is a folder"),
        (["--out", "/proc/forbidden"], "cannot be created or written"),
    ]
    for args, match in cases:
        assert main(["demo", "--steps", "1", *args]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1 and "Traceback" not in err
    for args, match in [
        (["--sampling-steps", "5000"], "must be an integer in 1..1000, got 5000"),
        (["--steps", "abc"], "expected an integer, got 'abc'"),
        (["--seed", "-1"], "must be an integer in 0.."),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and match in err and err.count("\n") == 1


# -- 10. smaller ones ---------------------------------------------------------------------------
def test_small_argument_errors():
    model = _model()
    with pytest.raises(TypeError, match=r"generator=torch.Generator\(\).manual_seed\(0\)"):
        model.sample(2, 5, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sampler_kwargs must be a dict"):
        model.sample(2, 5, sampler_kwargs="abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'nope' is not a device name"):
        model.sample(2, 5, device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            model.sample(2, 5, device="cuda")
    with pytest.raises(ValueError, match=r"bsz=1000000000000 is too large.*smaller batches"):
        model.sample(10**12, 5)
    with pytest.raises(TypeError, match="must hold numbers.*got '10'"):
        model.sample(2, timestep_spacing=["10", "5"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model.loss(torch.randn(2, 2), generator=1)  # type: ignore[arg-type]


def test_strict_ints_in_the_config():
    with pytest.raises(ValueError, match="num_timesteps"):
        DiffusionModelConfig(input_shape=(2,), num_timesteps=True)
    with pytest.raises(ValueError, match="input_shape"):
        DiffusionModelConfig(input_shape=(True,))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLP(2, hidden_dim=True), "hidden_dim as an int"),
        (lambda: MLP(2, hidden_dim=16.0), "hidden_dim as an int"),
        (lambda: MLP(2, num_layers=0), "num_layers in 1..1024"),
        (lambda: UNet(1, channel_mults="12"), "channel_mults as a tuple"),
        (lambda: UNet(1, channel_mults=(1, 2.5)), "each of channel_mults as an int"),
        (lambda: UNet(1, num_res_blocks=10**6), "num_res_blocks in 1..1024"),
    ],
)
def test_network_constructor_arguments(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_pickled_checkpoint_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path(marker).write_text, ("ran",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SerializationError, match="not a valid safetensors file|header claims"):
        load_checkpoint(path, mlp_model())
    with pytest.raises(SerializationError, match="not a valid safetensors file|header claims"):
        read_checkpoint(path)
    assert not marker.exists()
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(SerializationError, match="not a tinydiff checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors", mlp_model())


def test_failed_from_pretrained_leaves_a_given_network_unchanged(tmp_path):
    from _nets import TinyNet
    from safetensors import safe_open

    custom = DiffusionModel(TinyNet(2), DiffusionModelConfig(input_shape=(2,), num_timesteps=20))
    custom.save_pretrained(tmp_path)
    tensors = st_load((tmp_path / "model.safetensors").read_bytes())
    tensors["nn_module.net.0.bias"] = torch.zeros(7)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # keeps the save id
        metadata = f.metadata()
    (tmp_path / "model.safetensors").write_bytes(st_save(tensors, metadata=metadata))
    net = TinyNet(2)
    before = _state(net)
    with pytest.raises(SerializationError, match=r"net\.0\.bias: shape \(7,\) in the file"):
        DiffusionModel.from_pretrained(tmp_path, nn_module=net)
    assert _same(before, _state(net))


# -- issue 20: configs that can sample, JSON and links ----------------------------------------------
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {
                "noise_schedule_type": "linear",
                "schedule_kwargs": {"beta_start": 0.5, "beta_end": 0.1},
            },
            "beta_start <= beta_end",
        ),
        (
            {
                "noise_schedule_type": "scaled_linear",
                "schedule_kwargs": {"beta_start": 0.1, "beta_end": 0.01},
            },
            "beta_start <= beta_end",
        ),
        (
            {"noise_schedule_type": "linear", "schedule_kwargs": {"beta_end": float("nan")}},
            "beta_end must be a number in \\(0, 1\\)",
        ),
        ({"noise_schedule_type": "linear", "schedule_kwargs": {"beta_end": 1.5}}, "in \\(0, 1\\)"),
        ({"noise_schedule_type": "cosine", "schedule_kwargs": {"s": -1}}, "s .* >= 0"),
        ({"noise_schedule_type": "cosine", "schedule_kwargs": {"s": float("inf")}}, "s .* >= 0"),
        ({"noise_schedule_type": "cosine", "schedule_kwargs": {"max_beta": 0}}, "max_beta"),
        (
            {
                "noise_schedule_type": "edm",
                "target_type": "edm",
                "target_kwargs": {"sigma_data": float("inf")},
            },
            "sigma_data",
        ),
        (
            {
                "noise_schedule_type": "edm",
                "target_type": "edm",
                "target_kwargs": {"sigma_data": 1e30},
            },
            "sigma_data",
        ),
        (
            {"noise_schedule_type": "edm", "schedule_kwargs": {"rho": float("inf")}},
            "rho must be a finite",
        ),
    ],
)
def test_schedule_parameters_are_checked_by_the_config(fields, match):
    with pytest.raises(ValueError, match=match):
        DiffusionModelConfig(input_shape=(2,), **fields)


def test_constant_betas_and_edge_values_still_sample():
    for fields in (
        {
            "noise_schedule_type": "linear",
            "schedule_kwargs": {"beta_start": 1e-3, "beta_end": 1e-3},
        },
        {"noise_schedule_type": "cosine", "schedule_kwargs": {"s": 0}},
        {"noise_schedule_type": "edm", "target_type": "edm", "target_kwargs": {"sigma_data": 1e18}},
    ):
        model = DiffusionModel(TinyNet(2), DiffusionModelConfig(input_shape=(2,), **fields))
        assert torch.isfinite(model.sample(4, 3)).all()


def test_duplicate_json_keys_are_refused(tmp_path):
    from tinydiff._safetensors import load_json

    with pytest.raises(SerializationError, match="'a' appears twice"):
        load_json('{"a": 1, "b": {"c": 2}, "a": 3}', "doc")
    with pytest.raises(SerializationError, match="appears twice"):
        load_json('{"b": {"c": 2, "c": 3}}', "doc")
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, torch.nn.Linear(2, 2), step=3)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]["tinydiff"]
    header["__metadata__"]["tinydiff"] = meta.replace('"step": 3', '"step": 3, "step": 7')
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(SerializationError, match="'step' appears twice"):
        load_checkpoint(path, torch.nn.Linear(2, 2))


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_loop_is_a_library_error(tmp_path):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    with pytest.raises(SerializationError, match="cannot be opened"):
        read_checkpoint(tmp_path / "a.safetensors")
    with pytest.raises(SerializationError, match="cannot be opened"):
        load_checkpoint(tmp_path / "a.safetensors", torch.nn.Linear(2, 2))


def test_the_meta_device_is_refused_before_sampling() -> None:
    """A device, init_noise or network on the meta device holds no data: a clear ValueError
    instead of torch's raw device or copy errors."""
    from tinydiff.nn import MLP

    model = DiffusionModel(MLP(2, hidden_dim=8, num_layers=1), input_shape=(2,))
    with pytest.raises(ValueError, match="meta device holds no data"):
        model.sample(2, 3, device="meta")
    with pytest.raises(ValueError, match="init_noise is on the meta device"):
        model.sample(2, 3, init_noise=torch.empty(2, 2, device="meta"))
    empty = DiffusionModel(MLP(2, hidden_dim=8, num_layers=1).to("meta"), input_shape=(2,))
    with pytest.raises(ValueError, match="network's weights are on 'meta'"):
        empty.sample(2, 3)
