"""Pretrained models: [`HubMixin`][tinydiff.hub.HubMixin] gives ``DiffusionModel``
``save_pretrained``, ``from_pretrained`` and ``push_to_hub``, without pickle.

A saved model is a folder (locally or as a Hugging Face Hub repository) holding:

* ``config.json``: ``schema_version`` (an integer: 3 for a plain model, 4 for a flow-map
  model, see [`SCHEMA_VERSION`][tinydiff.hub.SCHEMA_VERSION]), the writing ``tinydiff_version``, the
  full [`DiffusionModelConfig`][tinydiff.DiffusionModelConfig] (``model``), the
  parameters' floating ``dtype``, the network (``network``: for a built-in
  [`tinydiff.nn`][tinydiff.nn] network its class name, e.g. ``"tinydiff.nn.MLP"``, and its
  init arguments; for a diffusers model wrapped in a
  [`DiffusersUNet`][tinydiff.diffusers_compat.DiffusersUNet] (what ``from_diffusers``
  builds) ``"diffusers.UNet2DModel"`` or another class of
  [`DIFFUSERS_NETWORKS`][tinydiff.hub.DIFFUSERS_NETWORKS] and its diffusers config;
  ``null`` for a custom network, which the caller passes in again), and the EMA options
  (``ema``: ``decay``, ``warmup``, ``update_every``; ``null`` without EMA);
* ``model.safetensors``: ``DiffusionModel.state_dict()`` (keys ``nn_module.*``);
* ``ema.safetensors`` (only with EMA): [`EMA.state_dict`][tinydiff.ema.EMA.state_dict]
  (the averaged network under ``module.*``, plus ``n_averaged`` and ``num_calls``);
* ``README.md``: a `huggingface_hub.ModelCard` (YAML metadata, the config table, a
  usage snippet);
* ``tinydiff_manifest.json`` ([`MANIFEST_NAME`][tinydiff.hub.MANIFEST_NAME], since
  schema 3): the save id that every file above carries (safetensors header metadata, a
  ``_tinydiff_save_id`` key in config.json), written last.

Saves are folder-atomic (`tinydiff._atomic.FolderWriter`): all files are written to
temporary files first and renamed in a burst, the manifest last; ``from_pretrained`` checks
each file's save id on the very file descriptor it reads. After a crash at any point, or
while another process saves into the folder, a load gives the old model, the new one, or a
clear `MixedSaveError` (a local folder being rewritten is retried a few times); never new
weights under an old config. Folders saved before manifests existed (schema 1 and 2) load as
before.

What tinydiff adds to `huggingface_hub` and `safetensors` (which do the downloads,
cache, tokens, offline mode, uploads, model cards, and validate safetensors headers):

* nothing is ever unpickled: ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` weights are refused;
* a Hub load resolves the revision once (`huggingface_hub.snapshot_download`), so
  its files all come from one commit; ``revision`` and repository ids are checked before
  they reach the cache;
* bounded loading: the network in config.json is built on the meta device and its tensor
  names, shapes and dtypes are compared with the safetensors headers (whose offsets
  safetensors checks against the file size) before anything is allocated; only regular
  files are opened, and the header length, JSON size and nesting are capped;
* strict loading: missing, unexpected, wrongly shaped or typed tensors are one error naming
  the keys; only classes from [`tinydiff.nn`][tinydiff.nn] and the diffusers classes of
  [`DIFFUSERS_NETWORKS`][tinydiff.hub.DIFFUSERS_NETWORKS] are rebuilt from a config
  (diffusers' ones on the meta device, their config keys checked against the class), no
  class path is imported; ``schema_version`` is checked; a missing plugin is named.

tinydiff does not inherit `huggingface_hub.ModelHubMixin`: that mixin captures
constructor arguments as the config (``DiffusionModel`` takes a network object plus a
pydantic config), and its PyTorch loader falls back to ``torch.load`` for ``.bin`` files.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from tinydiff._atomic import MANIFEST_NAME as _MANIFEST_NAME
from tinydiff._atomic import (
    FolderWriter,
    MixedSaveError,
    SaveManifest,
    folder_lock,
    open_safetensors_member,
    read_json_member,
    read_manifest,
)
from tinydiff._safetensors import (
    SafetensorsFile,
    SerializationError,
    check_count,
    check_entries,
    check_regular_file,
)
from tinydiff._validation import check_device
from tinydiff._version import __version__
from tinydiff.config import DiffusionModelConfig, config_from_saved
from tinydiff.denoiser import takes_end_time
from tinydiff.diffusers_compat import DiffusersUNet
from tinydiff.nn import MLP, UNet

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from tinydiff.ema import EMA


class SavableModel(Protocol):
    """What serialization needs of a model (`tinydiff.DiffusionModel` has it): its config,
    network, state dicts and EMA."""

    config: Any
    nn_module: nn.Module

    @property
    def ema(self) -> EMA | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def ema_state_dict(self) -> dict[str, Tensor]: ...


__all__ = [
    "CONFIG_NAME",
    "DIFFUSERS_NETWORKS",
    "EMA_WEIGHTS_NAME",
    "MANIFEST_NAME",
    "PLAIN_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "WEIGHTS_NAME",
    "HubMixin",
    "MixedSaveError",
    "ModelNotFoundError",
    "SerializationError",
    "read_safetensors",
]

SCHEMA_VERSION = 4
"""The newest config.json layout, read and written here: 1 (tinydiff 0.1), 2 (0.2, no save
id), 3 (save ids) and 4 are read. Plain models are written as schema 3 (so tinydiff 0.2
reads them); a model with a two-time network (``end_time=True``) or a training objective
other than ``"diffusion"`` is written as schema 4, which older versions refuse with
"upgrade tinydiff" rather than misread."""
PLAIN_SCHEMA_VERSION = 3
"""The schema of a plain model's config.json (one-time network, the diffusion objective)."""
CONFIG_NAME = "config.json"
"""The file name of a saved model's configuration (the model config, network and EMA options)."""
WEIGHTS_NAME = "model.safetensors"
"""The file name of a saved model's weights, ``DiffusionModel.state_dict()`` in safetensors."""
EMA_WEIGHTS_NAME = "ema.safetensors"
"""The file name of a saved model's EMA state (only when the model had an EMA)."""
MANIFEST_NAME = _MANIFEST_NAME
"""The file name of a saved folder's manifest: the save id that ties its files together, written
last (since tinydiff 0.3; a folder without one is read as saved by an earlier tinydiff)."""
README_NAME = "README.md"
#: loads of a local folder that another process saves into meanwhile are tried this often
_LOAD_RETRIES = 6
#: read_safetensors' header cap (safetensors' own); from_pretrained derives a tighter one
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: a branch, tag, ``refs/pr/N`` or commit sha; never a path that could leave the cache
_REVISION = re.compile(r"(?!.*\.\.)(?!.*//)(?!.*\.lock$)[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}(?<!/)")

_COMMIT = re.compile(r"[0-9a-f]{40}")

#: the only networks rebuilt from a config: name in config.json -> class
BUILTIN_NETWORKS: dict[str, type[nn.Module]] = {"tinydiff.nn.MLP": MLP, "tinydiff.nn.UNet": UNet}
DIFFUSERS_NETWORKS = ("UNet2DModel", "UNet2DConditionModel")
"""The diffusers model classes that `save_pretrained` records by name (as
``"diffusers.<class>"``, with their config) and `from_pretrained` rebuilds; any other
network is saved as a custom one (pass it again as ``nn_module=``)."""
_DIFFUSERS_PREFIX = "diffusers."
#: bounds on a diffusers config from a file, checked before the network is built
_MAX_DIFFUSERS_INT = 1 << 20
_MAX_DIFFUSERS_LIST = 32
_MAX_DIFFUSERS_LAYERS = 64
_DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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
    """The layout of config.json (schema versions 1 and 2); ``model`` is validated separately."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    schema_version: int
    library_name: str
    tinydiff_version: str
    dtype: str | None
    model: dict[str, Any]
    network: _NetworkSpec | None
    ema: _EmaOptions | None


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read every tensor of a safetensors file onto the CPU (a regular file; header checked
    by safetensors, and capped at `MAX_HEADER_BYTES`).

    Raises:
        SerializationError: not a regular file, a truncated or corrupt file, a header over
            the cap, anything else safetensors refuses.
    """
    with SafetensorsFile(path, max_header_bytes=MAX_HEADER_BYTES) as f:
        return {key: f.get(key) for key in f.entries}


# -- saving ----------------------------------------------------------------------------------------
def _network_spec(net: nn.Module) -> dict[str, Any] | None:
    for name, cls in BUILTIN_NETWORKS.items():
        if type(net) is cls:
            return {"class_name": name, "config": net.config}
    if type(net) is DiffusersUNet:
        return _diffusers_spec(net.unet)
    return None


def _diffusers_spec(unet: nn.Module) -> dict[str, Any] | None:
    """``{"class_name": "diffusers.UNet2DModel", "config": ...}`` for a diffusers model of
    `DIFFUSERS_NETWORKS` (its own class, not a subclass), else None (a custom network)."""
    import sys

    diffusers = sys.modules.get("diffusers")  # a diffusers model exists: diffusers is imported
    name = type(unet).__name__
    if (
        diffusers is None
        or name not in DIFFUSERS_NETWORKS
        or type(unet) is not getattr(diffusers, name, None)
    ):
        return None
    own: dict[str, Any] = dict(unet.config)  # type: ignore[arg-type]
    config = {k: v for k, v in own.items() if not str(k).startswith("_")}
    try:
        config = json.loads(json.dumps(config, allow_nan=False))  # tuples -> lists
    except (TypeError, ValueError):  # a value JSON cannot hold: store it as a custom network
        return None
    return {"class_name": _DIFFUSERS_PREFIX + name, "config": config}


def build_config(model: SavableModel) -> dict[str, Any]:
    """The config.json document of ``model`` (module docstring)."""
    ema = model.ema
    dtype = next(
        (t.dtype for t in model.nn_module.state_dict().values() if t.is_floating_point()), None
    )
    fields = json.loads(model.config.model_dump_json())
    flow_map = fields["training_objective"] != "diffusion" or takes_end_time(model.nn_module)
    if not flow_map:  # the fields schema 3 has not: their defaults are implied
        del fields["training_objective"], fields["training_objective_kwargs"]
    return {
        "schema_version": SCHEMA_VERSION if flow_map else PLAIN_SCHEMA_VERSION,
        "library_name": "tinydiff",
        "tinydiff_version": __version__,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "model": fields,
        "network": _network_spec(model.nn_module),
        "ema": None
        if ema is None
        else {"decay": ema.decay, "warmup": ema.warmup, "update_every": ema.update_every},
    }


def model_card(config: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The README.md: card metadata, a description, the config table and a usage snippet."""
    net, ema = config["network"], config["ema"]
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in config["model"].items())
    where = repo_id or "path/to/this/folder"
    if net is None:
        arch = "a custom network (its architecture is not stored: pass it as `nn_module=`)"
        load = f'model = DiffusionModel.from_pretrained("{where}", nn_module=MyNet(...))'
    else:
        arch = f"`{net['class_name']}` with `{json.dumps(net['config'])}`"
        load = f'model = DiffusionModel.from_pretrained("{where}")'
    ema_line = (
        "EMA weights are included (decay "
        f"{ema['decay']}): `from_pretrained` loads them beside the live weights, for "
        "`sample(..., use_ema=True)`; `use_ema_weights=True` loads them as the live weights."
        if ema
        else "No EMA weights are included."
    )
    data = ModelCardData(library_name="tinydiff", tags=["diffusion", "tinydiff"])
    body = (
        f"# tinydiff diffusion model\n\nA denoising diffusion model saved with tinydiff "
        f"{config['tinydiff_version']}\n(config schema {config['schema_version']}). Network: "
        f"{arch}. {ema_line}\n\n## Configuration\n\n| field | value |\n| --- | --- |\n{rows}\n\n"
        f"## Usage\n\n```python\nfrom tinydiff import DiffusionModel\n\n{load}\n"
        "samples = model.sample(bsz=16)\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # clones: safetensors refuses tensors that share storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _save(model: SavableModel, folder: Path, repo_id: str | None) -> Path:
    """Write the files of ``model`` into ``folder`` as one folder-atomic save (module
    docstring); a stale ema.safetensors of an earlier save with EMA goes after the commit."""
    config = build_config(model)
    card = str(model_card(config, repo_id)).encode()
    with FolderWriter(folder) as save:
        save.write_safetensors(WEIGHTS_NAME, _tensors(model.state_dict()))
        if model.ema is not None:
            save.write_safetensors(EMA_WEIGHTS_NAME, _tensors(model.ema_state_dict()))
        elif os.path.lexists(folder / EMA_WEIGHTS_NAME):
            save.discard(EMA_WEIGHTS_NAME)
        save.write_json(CONFIG_NAME, config)
        save.write_bytes(README_NAME, card)
    return folder


# -- where the files are -----------------------------------------------------------------------
def check_revision(revision: Any) -> str | None:
    """None or a branch / tag / ``refs/pr/N`` / commit sha that cannot name a path outside
    the Hub cache (no ``..``, no leading or trailing ``/``, no ``\\``)."""
    if revision is None:
        return None
    if not isinstance(revision, str):
        raise TypeError(f"revision must be a str (branch, tag or commit sha), got {revision!r}")
    if not _REVISION.fullmatch(revision):
        raise ValueError(
            f"revision {revision!r:.80} is not a valid branch, tag or commit name: expected "
            "letters, digits and . _ - + /, without '..', '//' or a leading or trailing '/' "
            "(e.g. 'main', 'v1.0', 'refs/pr/3' or a 40-character commit sha)"
        )
    return revision


class _Source:
    """A local folder, or one commit of a Hub repository downloaded with snapshot_download."""

    def __init__(self, name_or_path: str | os.PathLike[str], files: list[str], **hub: Any) -> None:
        self.name = os.fspath(name_or_path)
        self.hub = hub
        path = Path(name_or_path)
        self.remote = not path.is_dir()
        if not self.remote:
            self.folder = path
            return
        if path.exists():
            raise ModelNotFoundError(
                f"{self.name} is a file; from_pretrained needs the folder that save_pretrained "
                "wrote (config.json, model.safetensors) or a Hub repository id"
            )
        rev = hub["revision"]
        try:
            validate_repo_id(self.name)
            self.folder = Path(snapshot_download(self.name, allow_patterns=files, **hub))
            if not _COMMIT.fullmatch(self.folder.name) or self.folder.parent.name != "snapshots":
                # a cache ref file whose content is not a commit sha (e.g. "../../elsewhere")
                raise ValueError(f"the cache resolved it to {self.folder}, not a commit snapshot")
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
                f"{', '.join(files)} of {self.name!r}{self._at()}: one or more is not in the "
                "local cache, and the Hub cannot be "
                "reached (offline mode, local_files_only=True, or no connection); download it "
                "once while online"
            ) from None
        except ValueError as err:  # e.g. a cache ref whose content points outside the cache
            raise ModelNotFoundError(
                f"the Hub cache entry of {self.name!r}{self._at()} is corrupt ({err}); delete "
                "it (huggingface-cli delete-cache) and download again"
            ) from None

    def _at(self) -> str:
        rev = self.hub.get("revision")
        return f" at revision {rev!r}" if rev else ""

    def _pickled(self) -> list[str]:
        if not self.remote:
            names = [p.name for p in self.folder.iterdir()]
        else:
            try:  # best effort, only to improve an error message; the commit just resolved
                api = HfApi(token=self.hub["token"])
                names = api.list_repo_files(self.name, revision=self.folder.name)
            except Exception:
                names = []
        return sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))

    def get(self, filename: str) -> Path:
        """The local path of ``filename`` (a regular file), or a clear error."""
        path = self.folder / filename
        if os.path.lexists(path):
            return check_regular_file(path, filename)
        offline = self.hub.get("local_files_only") or constants.HF_HUB_OFFLINE
        if self.remote and offline:
            raise ModelNotFoundError(
                f"{filename} of {self.name!r}{self._at()} is not in the local cache, and the Hub "
                "cannot be reached (offline mode or local_files_only=True); download it once "
                "while online"
            )
        pickled = self._pickled()
        if pickled:
            raise SerializationError(
                f"{self.name} has no {filename} but pickled weights ({', '.join(pickled)}): "
                "tinydiff never unpickles files (they can run arbitrary code). Convert them to "
                "safetensors with the model's own code, or re-save with save_pretrained."
            )
        raise ModelNotFoundError(
            f"{self.name} has no {filename}: not a tinydiff model saved with save_pretrained"
        )

    def manifest(self) -> SaveManifest | None:
        """The folder's save manifest (None for a folder saved before manifests existed)."""
        return read_manifest(self.folder)

    def state(self) -> tuple[tuple[str, int, int], ...]:
        """What changes when a save writes into a local folder: its entries' names, inodes and
        modification times (temporary files included)."""
        out = []
        try:
            for entry in os.scandir(self.folder):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append((entry.name, st.st_ino, st.st_mtime_ns))
        except OSError:
            pass
        return tuple(sorted(out))

    def _listed(self, filename: str, manifest: SaveManifest | None) -> None:
        """`get`, with a clearer error for a file that the manifest of a local folder lists
        but that is missing (deleted by hand, or the folder changed while it was read)."""
        try:
            self.get(filename)
        except ModelNotFoundError:
            if self.remote or manifest is None or filename not in manifest:
                raise
            raise ModelNotFoundError(
                f"{self.name} has no {filename}, which its manifest ({MANIFEST_NAME}) lists: "
                "the file was deleted, or the folder changed while it was read. Save the model "
                "into it again."
            ) from None

    def read_json(self, filename: str, manifest: SaveManifest | None, max_bytes: int) -> Any:
        """The JSON document ``filename`` (one open; its save id checked and removed)."""
        self._listed(filename, manifest)
        return read_json_member(self.folder, filename, manifest, max_bytes=max_bytes)

    def open_safetensors(
        self, filename: str, manifest: SaveManifest | None, max_header_bytes: int, what: str
    ) -> SafetensorsFile:
        """``filename`` opened once, its header's save id checked against ``manifest``."""
        self._listed(filename, manifest)
        return open_safetensors_member(
            self.folder, filename, manifest, max_header_bytes=max_header_bytes, what=what
        )


# -- reading config.json -------------------------------------------------------------------------
def _read_config(source: _Source, manifest: SaveManifest | None) -> tuple[Path, _ConfigFile]:
    """(path, parsed config.json): read through one open, its save id checked."""
    path = source.folder / CONFIG_NAME
    doc = source.read_json(CONFIG_NAME, manifest, MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise SerializationError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SerializationError(
            f"{path} has no integer schema_version: not a tinydiff config.json"
        )
    if version > SCHEMA_VERSION:
        raise SerializationError(
            f"{path} was written by a newer tinydiff ({doc.get('tinydiff_version', '?')!s:.40}, "
            f"config schema {version}; this is tinydiff {__version__}, schema {SCHEMA_VERSION}): "
            "upgrade tinydiff (pip install -U tinydiff) to load it"
        )
    if version < 1:
        raise SerializationError(
            f"{path} has schema_version {version}; tinydiff config files start at 1 (this "
            f"tinydiff reads 1..{SCHEMA_VERSION}): the file is corrupt or not from tinydiff"
        )
    try:
        return path, _ConfigFile.model_validate(doc)
    except ValidationError as err:
        raise SerializationError(f"{path} is not a valid tinydiff config.json: {err}") from None


def _model_config(cfg: _ConfigFile, path: Path) -> DiffusionModelConfig:
    try:
        return config_from_saved(cfg.model, cfg.tinydiff_version)
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


def _build_network(cfg: _ConfigFile, path: Path, device: str) -> nn.Module:
    """The built-in network of config.json, on ``device`` ("meta": nothing allocated)."""
    spec = cfg.network
    if spec is None:
        raise SerializationError(
            f"{path} was saved from a custom network: its architecture is not stored, only its "
            "weights. Pass the network as from_pretrained(..., nn_module=MyNet(...)), built "
            "with the same arguments as when it was saved."
        )
    dtype = None if cfg.dtype is None else _DTYPE_NAMES.get(cfg.dtype)
    if cfg.dtype is not None and dtype is None:
        raise SerializationError(
            f"{path}: unknown dtype {cfg.dtype!r} (expected one of {', '.join(_DTYPE_NAMES)})"
        )
    if spec.class_name.startswith(_DIFFUSERS_PREFIX):
        build = _diffusers_builder(spec, path)
    else:
        cls = BUILTIN_NETWORKS.get(spec.class_name)
        if cls is None:
            known = [*BUILTIN_NETWORKS, *(_DIFFUSERS_PREFIX + n for n in DIFFUSERS_NETWORKS)]
            raise SerializationError(
                f"{path} names network class {spec.class_name!r}, which is not a built-in "
                f"tinydiff network or a diffusers class tinydiff rebuilds "
                f"({', '.join(known)}); pass the network as nn_module=..."
            )
        build = lambda: cls.from_config(spec.config)  # type: ignore[attr-defined]  # noqa: E731
    try:
        with torch.device(device):
            net = build()
    except (TypeError, ValueError, RuntimeError, OverflowError, AttributeError, KeyError) as err:
        raise SerializationError(
            f"{path}: cannot build {spec.class_name} from {spec.config!s:.300}: {err}"
        ) from None
    return net if dtype is None else net.to(dtype)


def _diffusers_builder(spec: _NetworkSpec, path: Path) -> Any:
    """A function building the [`DiffusersUNet`][tinydiff.diffusers_compat.DiffusersUNet] of
    ``spec`` (call it under a ``torch.device``); the class is looked up in the allowlist
    `DIFFUSERS_NETWORKS`, the config bounded and its keys checked against the class
    first. diffusers is imported here only (an optional dependency)."""
    name = spec.class_name[len(_DIFFUSERS_PREFIX) :]
    if name not in DIFFUSERS_NETWORKS:
        raise SerializationError(
            f"{path} names network class {spec.class_name!r}; tinydiff rebuilds only the "
            f"diffusers classes {', '.join(_DIFFUSERS_PREFIX + n for n in DIFFUSERS_NETWORKS)} "
            "from a config. Build the network yourself and pass it as nn_module=..."
        )
    _check_diffusers_config(spec.config, path)
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            f"{path} holds a diffusers {name}: loading it needs the optional dependency "
            'diffusers; install it with `pip install "tinydiff[diffusers]"` (or pass the '
            "network as nn_module=...)"
        ) from None
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(spec.config) - set(params)) if not takes_any else []
    if unknown:
        raise SerializationError(
            f"{path}: the {spec.class_name} config has keys that {name} does not take: "
            f"{', '.join(map(str, unknown[:12]))}; the file is corrupt or from another "
            "diffusers version (pass the network as nn_module=...)"
        )
    return lambda: DiffusersUNet(cls.from_config(spec.config))


def _check_diffusers_config(config: Any, path: Path) -> None:
    """Bound what a diffusers config from a file can make the constructor do (the network
    is built on the meta device and compared with the weights' header before anything is
    allocated; these bounds keep that build itself small): integers within
    +-`_MAX_DIFFUSERS_INT`, lists of at most `_MAX_DIFFUSERS_LIST` items, at most
    `_MAX_DIFFUSERS_LAYERS` layers per block."""
    for key, value in config.items():
        items, stack = [], [(value, 0)]
        while stack:  # a UNet option is a value, a list, or a list of lists
            node, depth = stack.pop()
            if isinstance(node, dict) or (isinstance(node, list) and depth >= 2):
                raise SerializationError(
                    f"{path}: diffusers config {key!r} is nested deeper than any UNet option "
                    "(a value, a list, or a list of lists); the file is corrupt"
                )
            if isinstance(node, list):
                stack.extend((child, depth + 1) for child in node)
            else:
                items.append(node)
        if len(items) > _MAX_DIFFUSERS_LIST:
            raise SerializationError(
                f"{path}: diffusers config {key!r} has {len(items)} items, more than the "
                f"{_MAX_DIFFUSERS_LIST} tinydiff accepts; the file is corrupt or not a UNet's"
            )
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                continue
            bound = _MAX_DIFFUSERS_LAYERS if "layers" in str(key) else _MAX_DIFFUSERS_INT
            if abs(item) > bound:
                raise SerializationError(
                    f"{path}: diffusers config {key}={value!s:.80} is out of range (at most "
                    f"{bound}); the file is corrupt or not a UNet's"
                )


_HINT = "Check that the network (nn_module=) has the architecture the weights were saved from."
M = TypeVar("M", bound="HubMixin")


# -- the methods ---------------------------------------------------------------------------------
class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a model class
    constructed as ``cls(network, config)`` (huggingface_hub's ``ModelHubMixin`` pattern).

    The public methods are generic templates: argument checks and resolving the files (a local
    folder or one Hub commit). They call two hooks that a class may override:
    `_save_pretrained` (write the files into a folder) and `_from_pretrained` (build the
    model from the resolved files). The defaults store a tinydiff model (`SavableModel`).
    """

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, repo_id: str | None = None
    ) -> Path:
        """Save to a folder: config.json, model.safetensors, ema.safetensors, README.md and
        the manifest that ties them together, as one folder-atomic save.

        The layout is described in [`tinydiff.hub`][tinydiff.hub]. Built-in
        [`tinydiff.nn`][tinydiff.nn] networks are stored with their class name and init
        arguments, so [`from_pretrained`][tinydiff.hub.HubMixin.from_pretrained] needs
        nothing else; so are the diffusers classes of
        [`DIFFUSERS_NETWORKS`][tinydiff.hub.DIFFUSERS_NETWORKS] wrapped in a
        [`DiffusersUNet`][tinydiff.diffusers_compat.DiffusersUNet] (what ``from_diffusers``
        builds), with their diffusers config. A custom network's weights are stored but not
        its architecture. The EMA weights and options are saved too when ``enable_ema`` was
        called; a stale ema.safetensors from an earlier save with EMA is removed after the
        new save is complete. Files in the folder that tinydiff did not write are kept.

        Args:
            save_directory: the folder (created if needed). A crash at any point, or a
                concurrent save, leaves the old save or the new one for `from_pretrained`
                (or a clear `MixedSaveError`), never a mix.
            repo_id: optional Hub repository id shown in the model card's usage snippet.

        Returns:
            the folder.
        """
        return self._save_pretrained(Path(save_directory), repo_id)

    def _save_pretrained(self, folder: Path, repo_id: str | None) -> Path:
        """Hook: write the model's files into ``folder`` (created if needed)."""
        return _save(self, folder, repo_id)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(
        cls: type[M],
        name_or_path: str | os.PathLike[str],
        *,
        nn_module: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        load_ema: bool | None = None,
        use_ema_weights: bool = False,
        device: torch.device | str = "cpu",
    ) -> M:
        """Load a model written by
        [`save_pretrained`][tinydiff.hub.HubMixin.save_pretrained], from a folder or a Hub
        repository.

        A Hub repository is resolved to one commit and downloaded with
        `huggingface_hub.snapshot_download` (its cache, tokens and offline mode,
        ``HF_HUB_OFFLINE=1``), so all files come from the same commit. Weights are only
        ever read from safetensors files (never unpickled), after the network has been
        built on the meta device and its tensor names, shapes and dtypes compared with the
        files' headers; then they are loaded strictly. Each file's save id is checked
        against the folder's manifest on the file it is read from, so a folder that another
        process saves into meanwhile never loads as a mix (a local folder is read again, a
        few times, before `MixedSaveError` is raised).

        Args:
            name_or_path: a local folder, or a Hub repository id ``"user/name"``.
            nn_module: the network to load the weights into; required when the model was
                saved from a custom network (only [`tinydiff.nn`][tinydiff.nn] networks are rebuilt
                from the config); optional (overrides the stored one) otherwise.
            revision: Hub branch, tag or commit sha (default: main).
            token: Hub token (default: the logged-in one); ``False`` for none.
            cache_dir: Hub cache folder (default: huggingface_hub's).
            local_files_only: use the cache only, never the network.
            force_download: download again even if cached.
            load_ema: also load the saved EMA: the model gets an EMA (the saved options and
                state) beside the live weights, for ``sample(..., use_ema=True)`` or more
                training. None (the default): load it when the folder has one (and
                use_ema_weights is off); True: it must have one; False: never.
            use_ema_weights: load the saved EMA weights *as the live weights* (no EMA on the
                returned model); the usual choice for inference. Exclusive with load_ema.
            device: where to put the model.

        Returns:
            the model in eval mode (like diffusers' and transformers' loaders; call
            ``.train()`` before training on), of the calling class.

        Raises:
            tinydiff.hub.ModelNotFoundError: no such folder / repository / revision / file,
                a private repository without a valid token, or files not cached offline.
            tinydiff.hub.SerializationError: malformed or mismatched files (a config from a
                newer tinydiff, unknown plugin components, a custom network without
                ``nn_module=``, pickled weights only, corrupt safetensors, wrong keys,
                shapes or dtypes; missing EMA weights when asked for; a FIFO or device in
                place of a file).
            tinydiff.hub.MixedSaveError: the folder's files belong to different saves (an
                interrupted save, or one still writing after the retries).
            ValueError: a malformed ``revision``; load_ema=True with use_ema_weights; a
                device that does not exist here.
            ImportError: the folder holds a diffusers network and diffusers is not installed.
            TypeError: nn_module not a torch.nn.Module.
        """
        if load_ema and use_ema_weights:
            raise ValueError(
                "load_ema=True and use_ema_weights=True are exclusive: load_ema keeps the live "
                "weights and enables the EMA beside them; use_ema_weights loads the EMA weights "
                "as the live weights (without an EMA)"
            )
        if load_ema is not None and not isinstance(load_ema, bool):
            raise TypeError(f"load_ema must be None, True or False, got {load_ema!r:.40}")
        if nn_module is not None and not isinstance(nn_module, nn.Module):
            raise TypeError(f"nn_module must be a torch.nn.Module, got {type(nn_module).__name__}")
        target = check_device(device)
        wants_ema = load_ema is not False or use_ema_weights
        files = [MANIFEST_NAME, CONFIG_NAME, WEIGHTS_NAME] + (
            [EMA_WEIGHTS_NAME] if wants_ema else []
        )
        hub = {
            "revision": check_revision(revision),
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        try:
            source = _Source(name_or_path, files, **hub)
        except ModelNotFoundError:
            if load_ema is not None or use_ema_weights:
                raise
            # offline, with a cache from a load without the EMA: config.json decides whether
            # the EMA is wanted (and then says that it is not cached)
            source = _Source(name_or_path, files[:-1], **hub)
        for attempt in range(_LOAD_RETRIES):
            before = None if source.remote else source.state()
            try:
                # no commit of a save into a local folder runs while it is read (flock)
                with (
                    contextlib.nullcontext()
                    if source.remote
                    else folder_lock(source.folder, shared=True)
                ):
                    model = cls._from_pretrained(
                        source,
                        nn_module=nn_module,
                        load_ema=load_ema,
                        use_ema_weights=use_ema_weights,
                    )
                break
            except (MixedSaveError, FileNotFoundError) as err:
                if source.remote:
                    raise
                # a local folder that another process saves into: read it again; one that
                # stays as it is (an interrupted save, a file deleted) is an error at once
                time.sleep(0.01 * 2**attempt)
                if source.state() == before:
                    raise
                if attempt == _LOAD_RETRIES - 1:
                    raise MixedSaveError(
                        f"{source.name} changed while it was read ({err}; another process saved "
                        f"into the folder during {_LOAD_RETRIES} tries): load it again once the "
                        "other process has finished saving"
                    ) from None
        model.eval()  # type: ignore[attr-defined]
        return model.to(target)  # type: ignore[attr-defined, no-any-return]

    @classmethod
    def _from_pretrained(
        cls: type[M],
        source: _Source,
        *,
        nn_module: nn.Module | None,
        load_ema: bool | None,
        use_ema_weights: bool,
    ) -> M:
        """Hook: build the model from the files of ``source`` (``source.get(name)`` gives a
        local path), on the CPU: check every header before allocating, then load strictly.
        Every file is read through one open and its save id checked against the manifest
        (``source.manifest()``, ``source.read_json``, ``source.open_safetensors``)."""
        manifest = source.manifest()
        config_path, cfg = _read_config(source, manifest)
        model_config = _model_config(cfg, config_path)
        implicit = load_ema is None
        if implicit:  # the default: the EMA when the folder has one
            load_ema = cfg.ema is not None and not use_ema_weights
        if (load_ema or use_ema_weights) and cfg.ema is None:
            raise SerializationError(
                f"{source.name} holds no EMA weights (it was saved from a model without EMA); "
                "drop load_ema / use_ema_weights"
            )
        skip = " (or pass load_ema=False to load it without its EMA)" if implicit else ""
        # 1. the expected state on the meta device (a custom network is already built)
        net = _build_network(cfg, config_path, "meta") if nn_module is None else nn_module
        model: Any = cls(net, model_config)  # type: ignore[call-arg]
        ema_opts = cfg.ema.model_dump() if cfg.ema is not None else {}
        if load_ema:
            model.enable_ema(**ema_opts)
        # 2. the headers against it; a header cap from the number of tensors expected
        cap = (64 << 10) + 1024 * 2 * len(model.state_dict())
        weights = source.open_safetensors(
            EMA_WEIGHTS_NAME if use_ema_weights else WEIGHTS_NAME,
            manifest,
            cap,
            "EMA weights" if use_ema_weights else "weights",
        )
        ema_file = None
        try:
            if use_ema_weights:  # the EMA file's module.* are the live nn_module.*
                keys = {
                    "nn_module." + k[len("module.") :] if k.startswith("module.") else k: k
                    for k in weights.entries
                    if k not in ("n_averaged", "num_calls")
                }
            else:
                keys = {k: k for k in weights.entries}
            check_entries(model.state_dict(), weights, keys, what="model", hint=_HINT)
            if load_ema:
                try:
                    ema_file = source.open_safetensors(
                        EMA_WEIGHTS_NAME, manifest, cap, "EMA weights"
                    )
                    expected = model.ema_state_dict()
                    ema_keys = {k: k for k in ema_file.entries}
                    check_entries(expected, ema_file, ema_keys, what="EMA")
                    check_count(ema_file, "n_averaged", 1)
                    check_count(ema_file, "num_calls", 0)
                except (SerializationError, ModelNotFoundError) as err:
                    if not implicit or isinstance(err, MixedSaveError):
                        raise
                    raise type(err)(f"{err}{skip}") from None
            # 3. allocate: sizes now match files that safetensors checked against their size
            if nn_module is None:
                net = _build_network(cfg, config_path, "cpu")
                model = cls(net, model_config)  # type: ignore[call-arg]
            model.load_state_dict({k: weights.get(key) for k, key in keys.items()}, strict=True)
            if ema_file is not None:
                model.enable_ema(**ema_opts)
                model.load_ema_state_dict({k: ema_file.get(k) for k in ema_file.entries})
        finally:
            weights.close()
            if ema_file is not None:
                ema_file.close()
        return model  # type: ignore[no-any-return]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload tinydiff model",
        create_pr: bool = False,
    ) -> CommitInfo:
        """Create the Hub repository if needed and upload the folder of
        [`save_pretrained`][tinydiff.hub.HubMixin.save_pretrained].

        One commit holds config.json, model.safetensors, README.md, the save manifest (and
        ema.safetensors).

        Args:
            repo_id: ``"user/name"`` (or ``"name"`` for the token's user).
            private: visibility when the repository is created (an existing one keeps its own).
            token: Hub token with write access (default: the logged-in one).
            revision: branch to commit to (created from main if missing); default main.
            commit_message: the commit message.
            create_pr: open a pull request instead of committing directly.

        Returns:
            huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with ``.oid``, the
            commit sha to pin with ``from_pretrained(..., revision=...)``.
        """
        revision = check_revision(revision)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tinydiff-push-") as tmp:
            self._save_pretrained(Path(tmp), repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )
