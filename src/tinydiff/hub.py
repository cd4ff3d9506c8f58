"""Pretrained models: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, without pickle.

A saved model is a folder (locally or as a Hugging Face Hub repository) holding:

* ``config.json``: ``schema_version`` (an integer, :data:`SCHEMA_VERSION`), the writing
  ``tinydiff_version``, the full :class:`~tinydiff.DiffusionModelConfig` (``model``), the
  parameters' floating ``dtype``, the network (``network``: for a built-in
  :mod:`tinydiff.nn` network its class name, e.g. ``"tinydiff.nn.MLP"``, and its init
  arguments; ``null`` for a custom network, which the caller passes in again), and the EMA
  options (``ema``: ``decay``, ``warmup``, ``update_every``; ``null`` without EMA);
* ``model.safetensors``: ``DiffusionModel.state_dict()`` (keys ``nn_module.*``);
* ``ema.safetensors`` (only with EMA): :meth:`tinydiff.ema.EMA.state_dict` (the averaged
  network under ``module.*``, plus ``n_averaged`` and ``num_calls``);
* ``README.md``: a model card (YAML front matter, the config table, a usage snippet).

Nothing is ever unpickled: weights are read only from safetensors files whose header is
validated here first (header length, JSON, dtypes, shapes and byte offsets inside the file),
and ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` weights are refused. Loading is strict: missing,
unexpected, wrongly shaped or wrongly typed tensors are an error naming the keys. Only
classes from :mod:`tinydiff.nn` are ever rebuilt from a config; no class path is imported.

Everything that talks to the Hub (downloads, cache, revisions, tokens, offline mode,
uploads) goes through :mod:`huggingface_hub`. tinydiff does not inherit
:class:`huggingface_hub.ModelHubMixin`: the mixin captures constructor arguments as the
config (``DiffusionModel`` takes a network object plus a pydantic config), and its PyTorch
loader falls back to ``torch.load`` for ``.bin`` files; the folder layout is the same.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from tinydiff._version import __version__
from tinydiff.checkpoint import _atomic_write
from tinydiff.config import DiffusionModelConfig
from tinydiff.nn import MLP, UNet

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from tinydiff.model import DiffusionModel

__all__ = [
    "CONFIG_NAME",
    "EMA_WEIGHTS_NAME",
    "SCHEMA_VERSION",
    "WEIGHTS_NAME",
    "ModelNotFoundError",
    "SerializationError",
    "from_pretrained",
    "push_to_hub",
    "read_safetensors",
    "save_pretrained",
]

SCHEMA_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
README_NAME = "README.md"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 10 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: the only networks rebuilt from a config: name in config.json -> class
BUILTIN_NETWORKS: dict[str, type[nn.Module]] = {"tinydiff.nn.MLP": MLP, "tinydiff.nn.UNet": UNet}

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class SerializationError(ValueError):
    """A saved model's files are malformed, inconsistent with the model, or refused (pickle)."""


class ModelNotFoundError(FileNotFoundError):
    """No model at that path / repository / revision (or not readable with the given token)."""


class _EmaOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    decay: float
    warmup: bool
    update_every: int


class _NetworkSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    class_name: str
    config: dict[str, Any]


class _ConfigFile(BaseModel):
    """The layout of config.json (schema version 1); ``model`` is validated separately."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    schema_version: int
    library_name: str
    tinydiff_version: str
    dtype: str | None
    model: dict[str, Any]
    network: _NetworkSpec | None
    ema: _EmaOptions | None


# -- safetensors, validated ----------------------------------------------------------------------
def _check_header(path: Path) -> dict[str, dict[str, Any]]:
    """Validate a safetensors file's header without trusting it; return its tensor entries."""
    size = path.stat().st_size
    if size < 8:
        raise SerializationError(
            f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length"
        )
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise SerializationError(
                f"{path} is truncated or corrupt: its header claims {n} bytes but the file has "
                f"only {size - 8} after the length field"
            )
        if n > MAX_HEADER_BYTES:
            raise SerializationError(
                f"{path}: safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte cap"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SerializationError(
            f"{path}: the safetensors header is not valid JSON ({err})"
        ) from None
    if not isinstance(header, dict):
        raise SerializationError(f"{path}: the safetensors header must be a JSON object")
    data_size = size - 8 - n
    entries: dict[str, dict[str, Any]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SerializationError(
                f"{path}: tensor {key!r} needs exactly dtype, shape and data_offsets in the header"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise SerializationError(
                f"{path}: tensor {key!r} has unsupported dtype {dtype!r} "
                f"(supported: {', '.join(_ST_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SerializationError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise SerializationError(
                f"{path} is truncated or corrupt: tensor {key!r} has data_offsets {offsets!r} "
                f"outside the {data_size} data bytes of the file"
            )
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise SerializationError(
                f"{path}: tensor {key!r} of dtype {dtype} and shape {shape} needs {nbytes} bytes "
                f"but its data_offsets span {offsets[1] - offsets[0]}"
            )
        entries[key] = info
    return entries


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read every tensor of a safetensors file onto the CPU, after validating its header.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        name -> tensor.

    Raises:
        SerializationError: a truncated or corrupt file, a header beyond the file or over
            :data:`MAX_HEADER_BYTES`, an unknown dtype, offsets or sizes that do not match.
    """
    path = Path(path)
    _check_header(path)
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except SafetensorError as err:
        raise SerializationError(f"{path}: invalid safetensors file ({err})") from None
    return tensors


def _key_list(keys: list[str], limit: int = 12) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_state(
    what: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str
) -> None:
    """Strict comparison of key sets, shapes and dtypes; one error listing every problem."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    for key in sorted(set(expected) & set(found)):
        want, got = expected[key], found[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(
                f"{key}: shape {tuple(got.shape)} in the file, {tuple(want.shape)} expected"
            )
        elif want.dtype != got.dtype:
            problems.append(f"{key}: dtype {got.dtype} in the file, {want.dtype} expected")
    if problems:
        raise SerializationError(
            f"{source} does not match the {what}: "
            + "; ".join(problems)
            + ". Check that the network (nn_module=) has the architecture the weights were "
            "saved from."
        )


def _to_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # clones: safetensors refuses tensors that share storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# -- saving ----------------------------------------------------------------------------------------
def _network_spec(net: nn.Module) -> dict[str, Any] | None:
    for name, cls in BUILTIN_NETWORKS.items():
        if type(net) is cls:
            return {"class_name": name, "config": net.config}
    return None


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


def build_config(model: DiffusionModel) -> dict[str, Any]:
    """The config.json document of ``model`` (module docstring)."""
    ema = model.ema
    dtype = _float_dtype(model.nn_module)
    return {
        "schema_version": SCHEMA_VERSION,
        "library_name": "tinydiff",
        "tinydiff_version": __version__,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "model": json.loads(model.config.model_dump_json()),
        "network": _network_spec(model.nn_module),
        "ema": None
        if ema is None
        else {"decay": ema.decay, "warmup": ema.warmup, "update_every": ema.update_every},
    }


def model_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """A README.md: YAML front matter, a description, the config table and a usage snippet."""
    net = config["network"]
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in config["model"].items())
    where = repo_id or "path/to/this/folder"
    if net is None:
        arch = "a custom network (its architecture is not stored: pass it as `nn_module=`)"
        load = f'model = DiffusionModel.from_pretrained("{where}", nn_module=MyNet(...))'
    else:
        arch = f"`{net['class_name']}` with `{json.dumps(net['config'])}`"
        load = f'model = DiffusionModel.from_pretrained("{where}")'
    ema = config["ema"]
    ema_line = (
        "EMA weights are included (`from_pretrained(..., load_ema=True)` or "
        f"`use_ema_weights=True`; decay {ema['decay']})."
        if ema
        else "No EMA weights are included."
    )
    return f"""---
library_name: tinydiff
tags:
- diffusion
- tinydiff
---

# tinydiff diffusion model

A denoising diffusion model saved with tinydiff {config["tinydiff_version"]}
(config schema {config["schema_version"]}). Network: {arch}. {ema_line}

## Configuration

| field | value |
| --- | --- |
{rows}

## Usage

```python
from tinydiff import DiffusionModel

{load}
samples = model.sample(bsz=16)
```
"""


def save_pretrained(
    model: DiffusionModel, save_directory: str | os.PathLike[str], *, repo_id: str | None = None
) -> Path:
    """Write config.json, model.safetensors, ema.safetensors (with EMA) and README.md.

    Each file is written atomically; a stale ema.safetensors from an earlier save of a model
    with EMA is removed.

    Args:
        model: the model to save.
        save_directory: the folder (created if needed).
        repo_id: optional Hub repository id, used in the model card's usage snippet.

    Returns:
        the folder.
    """
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = build_config(model)
    _atomic_write(folder / WEIGHTS_NAME, st_save(_to_cpu(model.state_dict())))
    ema_path = folder / EMA_WEIGHTS_NAME
    if model.ema is not None:
        _atomic_write(ema_path, st_save(_to_cpu(model.ema_state_dict())))
    elif ema_path.exists():
        ema_path.unlink()
    _atomic_write(folder / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    _atomic_write(folder / README_NAME, model_card(config, repo_id).encode())
    return folder


def push_to_hub(
    model: DiffusionModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload tinydiff model",
    create_pr: bool = False,
) -> CommitInfo:
    """Save ``model`` to a temporary folder and upload it to the Hub in one commit.

    Args:
        model: the model.
        repo_id: ``"user/name"`` (or ``"name"``: the token's user).
        private: visibility when the repository is created (an existing one is unchanged).
        token: a Hub token (default: the logged-in / ``HF_TOKEN`` one).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: the commit message.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        huggingface_hub's ``CommitInfo`` (a ``str``: the commit URL; ``.oid`` is the sha).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tinydiff-push-") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


# -- loading ---------------------------------------------------------------------------------------
class _Source:
    """A local folder or a Hub repository; ``get(name)`` gives a local file path or None."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None,
        token: str | bool | None,
        cache_dir: str | os.PathLike[str] | None,
        local_files_only: bool,
        force_download: bool,
    ) -> None:
        self.name = str(name_or_path)
        path = Path(name_or_path)
        self.folder = path if path.is_dir() else None
        if self.folder is None and path.exists():
            raise ModelNotFoundError(
                f"{self.name} is a file; from_pretrained needs the folder that save_pretrained "
                "wrote (config.json, model.safetensors) or a Hub repository id"
            )
        self.revision = revision
        self.token = token
        self.kwargs: dict[str, Any] = dict(
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )

    def _listing(self) -> list[str]:
        if self.folder is not None:
            return sorted(p.name for p in self.folder.iterdir())
        try:
            return HfApi(token=self.token).list_repo_files(self.name, revision=self.revision)
        except Exception:  # best effort, only to improve an error message
            return []

    def missing(self, filename: str) -> Exception:
        pickled = [f for f in self._listing() if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            return SerializationError(
                f"{self.name} has no {filename} but pickled weights ({', '.join(pickled)}): "
                "tinydiff never unpickles files (they can run arbitrary code). Convert them to "
                "safetensors with the model's own code, or re-save with save_pretrained."
            )
        return ModelNotFoundError(
            f"{self.name} has no {filename}: not a tinydiff model saved with save_pretrained"
        )

    def get(self, filename: str, *, required: bool = True) -> Path | None:
        if self.folder is not None:
            path = self.folder / filename
            if path.is_file():
                return path
            if required:
                raise self.missing(filename)
            return None
        rev = self.kwargs["revision"]
        at = f" at revision {rev!r}" if rev else ""
        try:
            return Path(hf_hub_download(self.name, filename, **self.kwargs))  # type: ignore[arg-type]
        except HFValidationError:
            raise ModelNotFoundError(
                f"{self.name!r} is neither a local folder nor a valid Hub repository id"
            ) from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"Hub repository {self.name!r} not found, or private: pass token= (or log in) "
                "with access to it"
            ) from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(
                f"revision {rev!r} not found in Hub repository {self.name!r}"
            ) from None
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"{filename} of {self.name!r}{at} is not in the local cache, and the Hub cannot "
                "be reached (offline mode, local_files_only=True, or no connection); download "
                "it once while online"
            ) from None
        except EntryNotFoundError:
            if required:
                raise self.missing(filename) from None
            return None


def _read_config(path: Path) -> _ConfigFile:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SerializationError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SerializationError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise SerializationError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SerializationError(
            f"{path} has no integer schema_version: not a tinydiff config.json"
        )
    if version > SCHEMA_VERSION:
        raise SerializationError(
            f"{path} was written by a newer tinydiff ({doc.get('tinydiff_version', '?')}, config "
            f"schema {version}; this is tinydiff {__version__}, schema {SCHEMA_VERSION}): "
            "upgrade tinydiff (pip install -U tinydiff) to load it"
        )
    try:
        return _ConfigFile.model_validate(doc)
    except ValidationError as err:
        raise SerializationError(f"{path} is not a valid tinydiff config.json: {err}") from None


def _model_config(cfg: _ConfigFile, path: Path) -> DiffusionModelConfig:
    try:
        return DiffusionModelConfig.model_validate(cfg.model)
    except ValidationError as err:
        unknown = [e for e in err.errors() if "plugin" in str(e.get("msg", ""))]
        if unknown:
            names = ", ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}" for e in unknown)
            raise SerializationError(
                f"{path} names components that are not registered: {names}. The model was "
                "saved with a plugin that is not installed here; install the package that "
                f"provides it (entry-point group 'tinydiff.plugins'). Details: {err}"
            ) from None
        raise SerializationError(f"{path}: invalid DiffusionModelConfig: {err}") from None


def _build_network(cfg: _ConfigFile, path: Path) -> nn.Module:
    spec = cfg.network
    if spec is None:
        raise SerializationError(
            f"{path} was saved from a custom network: its architecture is not stored, only its "
            "weights. Pass the network as from_pretrained(..., nn_module=MyNet(...)), built "
            "with the same arguments as when it was saved."
        )
    cls = BUILTIN_NETWORKS.get(spec.class_name)
    if cls is None:
        raise SerializationError(
            f"{path} names network class {spec.class_name!r}, which is not a built-in tinydiff "
            f"network ({', '.join(BUILTIN_NETWORKS)}); pass the network as nn_module=..."
        )
    try:
        net = cls.from_config(spec.config)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as err:
        raise SerializationError(
            f"{path}: cannot build {spec.class_name} from {spec.config}: {err}"
        ) from None
    if cfg.dtype is not None:
        dtype = _DTYPE_NAMES.get(cfg.dtype)
        if dtype is None:
            raise SerializationError(
                f"{path}: unknown dtype {cfg.dtype!r} (expected one of {', '.join(_DTYPE_NAMES)})"
            )
        net = net.to(dtype)
    return net


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    nn_module: nn.Module | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    load_ema: bool = False,
    use_ema_weights: bool = False,
    device: torch.device | str = "cpu",
    model_cls: type[DiffusionModel] | None = None,
) -> DiffusionModel:
    """Load a model saved by :func:`save_pretrained` from a folder or a Hub repository.

    See :meth:`tinydiff.DiffusionModel.from_pretrained` for the arguments; ``model_cls`` is
    the class to build (default :class:`~tinydiff.DiffusionModel`; a subclass whose
    constructor takes ``(nn_module, config)``).
    """
    from tinydiff.model import DiffusionModel

    if model_cls is None:
        model_cls = DiffusionModel

    if load_ema and use_ema_weights:
        raise ValueError(
            "load_ema=True and use_ema_weights=True are exclusive: load_ema keeps the live "
            "weights and enables the EMA beside them; use_ema_weights loads the EMA weights "
            "as the live weights (without an EMA)"
        )
    if nn_module is not None and not isinstance(nn_module, nn.Module):
        raise TypeError(f"nn_module must be a torch.nn.Module, got {type(nn_module).__name__}")
    source = _Source(
        name_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    config_path = source.get(CONFIG_NAME)
    assert config_path is not None
    cfg = _read_config(config_path)
    model_config = _model_config(cfg, config_path)
    net = _build_network(cfg, config_path) if nn_module is None else nn_module
    wants_ema = load_ema or use_ema_weights
    if wants_ema and cfg.ema is None:
        raise SerializationError(
            f"{source.name} holds no EMA weights (it was saved from a model without EMA); "
            "drop load_ema / use_ema_weights"
        )
    weights_path = source.get(WEIGHTS_NAME)
    assert weights_path is not None
    model = model_cls(net, model_config)
    if use_ema_weights:
        ema_path = source.get(EMA_WEIGHTS_NAME)
        assert ema_path is not None
        ema_state = read_safetensors(ema_path)
        prefix = "module."
        state = {
            f"nn_module.{k[len(prefix) :]}": v for k, v in ema_state.items() if k.startswith(prefix)
        }
        where = f"{ema_path} (EMA weights)"
    else:
        state = read_safetensors(weights_path)
        where = str(weights_path)
    expected = model.state_dict()
    _check_state("model", expected, state, where)
    model.load_state_dict(state, strict=True)
    if load_ema:
        assert cfg.ema is not None
        ema_path = source.get(EMA_WEIGHTS_NAME)
        assert ema_path is not None
        ema_state = read_safetensors(ema_path)
        model.enable_ema(cfg.ema.decay, warmup=cfg.ema.warmup, update_every=cfg.ema.update_every)
        _check_state("EMA", model.ema_state_dict(), ema_state, str(ema_path))
        model.load_ema_state_dict(ema_state)
    return model.to(device)
