"""Training checkpoints without pickle: one safetensors file, written atomically.

Layout of a checkpoint file (a standard ``.safetensors`` file):

* tensors: ``model/<name>`` (the model's state dict), ``ema/<name>`` (the EMA's state),
  ``rng/torch`` (torch's global CPU RNG state, a uint8 tensor), ``rng/cuda/<i>``,
  ``rng/gen/<name>`` (named :class:`torch.Generator` states), and the tensors found inside
  the optimizer / LR scheduler / ``extra`` states (``optimizer/<i>`` ...);
* the safetensors header's metadata ``"tinydiff"``: a JSON document with the step, the
  format version, and the optimizer / scheduler / extra state dicts with every tensor
  replaced by a reference ``{"__tensor__": key}`` (dicts with non-str keys and tuples are
  encoded so that they round-trip exactly).

Writes go to a temporary file in the same directory, are flushed to disk, then
``os.replace``-d onto the target: a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

__all__ = ["load_checkpoint", "read_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1
_META_KEY = "tinydiff"


class _Encoder:
    """Nested Python state -> JSON-able value + a flat dict of tensors."""

    def __init__(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        self.prefix = prefix
        self.tensors = tensors
        self.count = 0

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            key = f"{self.prefix}/{self.count}"
            self.count += 1
            self.tensors[key] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self(v) for k, v in obj.items()}
            return {"__items__": [[self(k), self(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [self(v) for v in obj]}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(
            f"cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, "
            "None, lists, tuples and dicts only)"
        )


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: Any | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    save_rng: bool = True,
) -> None:
    """Write a training checkpoint atomically (module docstring).

    Args:
        path: the file (conventionally ``*.safetensors``); parent directories are created.
        model: its ``state_dict()`` is saved.
        optimizer: optional; its state (tensors included) is saved.
        scheduler: optional LR scheduler (anything with ``state_dict()``).
        ema: optional :class:`tinydiff.ema.EMA`; default: the model's own EMA when it is a
            :class:`tinydiff.DiffusionModel` with EMA enabled.
        step: the training step.
        extra: optional nested dict of tensors, numbers, strings, lists.
        generators: named generators whose states are saved (restore them by name).
        save_rng: also save torch's global CPU (and CUDA) RNG states.
    """
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model/{name}"] = value.detach().cpu().contiguous().clone()
    if ema is None and getattr(model, "ema", None) is not None:
        ema = model.ema
    if ema is not None:
        for name, value in ema.state_dict().items():
            tensors[f"ema/{name}"] = value.detach().cpu().contiguous().clone()
    if save_rng:
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = state
    for name, gen in (generators or {}).items():
        tensors[f"rng/gen/{name}"] = gen.get_state()
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "has_ema": ema is not None,
        "optimizer": None
        if optimizer is None
        else _Encoder("optimizer", tensors)(optimizer.state_dict()),
        "scheduler": None
        if scheduler is None
        else _Encoder("scheduler", tensors)(scheduler.state_dict()),
        "extra": _Encoder("extra", tensors)(extra or {}),
    }
    data = st_save(tensors, metadata={_META_KEY: json.dumps(meta)})
    _atomic_write(Path(path), data)


def read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Decode a checkpoint into plain state dicts without touching any object.

    Returns:
        dict with ``step``, ``model`` (state dict), ``ema`` (state dict or None),
        ``optimizer``, ``scheduler`` (state dicts or None), ``extra``, ``rng`` (torch's
        state or None), ``cuda_rng`` (list), ``generators`` (name -> state).
    """
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device=map_location) as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    if _META_KEY not in metadata:
        raise ValueError(f"{path} is not a tinydiff checkpoint (no {_META_KEY!r} metadata)")
    meta = json.loads(metadata[_META_KEY])

    def section(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    cuda = section("rng/cuda/")
    return {
        "step": int(meta["step"]),
        "model": section("model/"),
        "ema": section("ema/") if meta.get("has_ema") else None,
        "optimizer": _decode(meta["optimizer"], tensors),
        "scheduler": _decode(meta["scheduler"], tensors),
        "extra": _decode(meta["extra"], tensors),
        "rng": tensors.get("rng/torch"),
        "cuda_rng": [cuda[k] for k in sorted(cuda, key=int)],
        "generators": section("rng/gen/"),
    }


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: Any | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> int:
    """Restore what :func:`save_checkpoint` wrote into the given objects.

    Args:
        path: the checkpoint file.
        model: receives the model state (``load_state_dict(strict=strict)``).
        optimizer: optional; restored if given (error if absent from the file).
        scheduler: optional LR scheduler; restored if given (error if absent from the file).
        ema: optional EMA; default: the model's own EMA if enabled. A checkpoint with an
            EMA for a model without one (or the reverse) is an error.
        generators: named generators to restore (names must be in the file).
        restore_rng: restore torch's global RNG states.
        strict: passed to the model's ``load_state_dict``.

    Returns:
        the saved step.
    """
    ckpt = read_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=strict)
    if ema is None and getattr(model, "ema", None) is not None:
        ema = model.ema
    if (ema is None) != (ckpt["ema"] is None):
        raise ValueError(
            f"EMA mismatch: the checkpoint {'has' if ckpt['ema'] is not None else 'has no'} EMA "
            f"state but {'no' if ema is None else 'an'} EMA was given; call "
            "model.enable_ema(...) before loading (or disable it) to match"
        )
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            if ckpt[name] is None:
                raise ValueError(f"the checkpoint {path} holds no {name} state")
            obj.load_state_dict(ckpt[name])
    for name, gen in (generators or {}).items():
        if name not in ckpt["generators"]:
            raise ValueError(f"the checkpoint holds no generator named {name!r}")
        gen.set_state(ckpt["generators"][name])
    if restore_rng and ckpt["rng"] is not None:
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["step"]
