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
``os.replace``-d onto the target (`tinydiff._atomic.atomic_write_safetensors`): a run
killed mid-write leaves the previous checkpoint intact, and the next save removes the
temporary file it left. Reads open the file once and take the header and every tensor from
that one open file, so a checkpoint replaced by another process meanwhile is read entirely in
its old version or entirely in its new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinydiff._atomic import atomic_write, atomic_write_safetensors
from tinydiff._safetensors import (
    SafetensorsFile,
    SerializationError,
    check_count,
    check_entries,
    load_json,
)

__all__ = ["SerializationError", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

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


def _decode(obj: Any, get: Any, where: str) -> Any:
    """Invert :class:`_Encoder`; ``get(key)`` reads a tensor. Malformed input is refused."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if len(obj) != 1 or not isinstance(key, str):
                raise SerializationError(f"{where}: malformed tensor reference {obj!r:.80}")
            return get(key)
        if "__items__" in obj:
            items = obj["__items__"]
            if len(obj) != 1 or not isinstance(items, list):
                raise SerializationError(f"{where}: malformed dict encoding {obj!r:.80}")
            out = {}
            for item in items:
                if not isinstance(item, list) or len(item) != 2:
                    raise SerializationError(f"{where}: malformed dict item {item!r:.80}")
                key = _decode(item[0], get, where)
                try:
                    out[key] = _decode(item[1], get, where)
                except TypeError:  # an unhashable key
                    raise SerializationError(
                        f"{where}: dict key {key!r:.80} is not hashable"
                    ) from None
            return out
        if "__tuple__" in obj:
            values = obj["__tuple__"]
            if len(obj) != 1 or not isinstance(values, list):
                raise SerializationError(f"{where}: malformed tuple encoding {obj!r:.80}")
            return tuple(_decode(v, get, where) for v in values)
        return {k: _decode(v, get, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, get, where) for v in obj]
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    """One file written atomically (kept for callers of tinydiff <= 0.2's private name)."""
    atomic_write(path, data)


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

    Raises:
        ValueError: a NaN or infinite number in the optimizer / scheduler / extra state
            (nothing is written: the file could never be read back).
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
    try:  # NaN / inf (e.g. an optimizer's lr=inf) would make a file no reader accepts
        text = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ValueError(
            "cannot write a checkpoint: the optimizer / scheduler / extra state holds a NaN "
            "or infinite number (e.g. a learning rate of inf), which JSON cannot store; fix "
            "the value (store it as a tensor to keep it)"
        ) from None
    atomic_write_safetensors(Path(path), tensors, {_META_KEY: text})


class _Checkpoint:
    """An opened checkpoint whose header and metadata are validated; tensors read lazily."""

    def __init__(self, path: str | os.PathLike[str], max_header_bytes: int, device: str) -> None:
        self.file = SafetensorsFile(
            path, max_header_bytes=max_header_bytes, what="checkpoint", device=device
        )
        self.path = self.file.path
        try:
            self.meta = self._parse_meta()
        except BaseException:
            self.file.close()
            raise

    def _parse_meta(self) -> dict[str, Any]:
        where = f"checkpoint {self.path}"
        raw = self.file.metadata.get(_META_KEY)
        if raw is None:
            raise SerializationError(
                f"{where} is a safetensors file but not a tinydiff checkpoint (no {_META_KEY!r} "
                "metadata); write checkpoints with tinydiff.save_checkpoint"
            )
        meta = load_json(raw, f"{where}: the {_META_KEY!r} metadata")
        if not isinstance(meta, dict):
            raise SerializationError(f"{where}: the metadata must be a JSON object")
        missing = sorted(set(_META_FIELDS) - set(meta))
        unknown = sorted(set(meta) - set(_META_FIELDS))
        if missing or unknown:
            raise SerializationError(
                f"{where}: malformed metadata (missing fields: {missing or 'none'}, unknown "
                f"fields: {unknown or 'none'}); expected {', '.join(_META_FIELDS)}"
            )
        version = meta["format_version"]
        if not _is_int(version) or version < 1:
            raise SerializationError(
                f"{where}: format_version must be a positive int, got {version!r}"
            )
        if version > FORMAT_VERSION:
            raise SerializationError(
                f"{where} has format_version {version}, newer than this tinydiff's "
                f"{FORMAT_VERSION}: upgrade tinydiff (pip install -U tinydiff) to load it"
            )
        step = meta["step"]
        if not _is_int(step) or not 0 <= step < 2**63:
            raise SerializationError(
                f"{where}: step must be an int in 0..2**63-1, got {step!r:.40}; the file is corrupt"
            )
        if not isinstance(meta["has_ema"], bool):
            raise SerializationError(
                f"{where}: has_ema must be true or false, got {meta['has_ema']!r:.40}"
            )
        for name in ("optimizer", "scheduler"):
            if meta[name] is not None and not isinstance(meta[name], dict):
                raise SerializationError(f"{where}: {name} must be an object or null")
        if not isinstance(meta["extra"], dict):
            raise SerializationError(f"{where}: extra must be an object")
        return meta

    def section(self, prefix: str) -> dict[str, str]:
        """name inside the section -> tensor key in the file."""
        return {k[len(prefix) :]: k for k in self.file.entries if k.startswith(prefix)}

    def get(self, key: str) -> Tensor:
        if key not in self.file.entries:
            raise SerializationError(
                f"checkpoint {self.path}: the metadata refers to a tensor {key!r:.80} that the "
                "file does not hold; the file is corrupt"
            )
        return self.file.get(key)

    def decode(self, name: str) -> Any:
        return _decode(self.meta[name], self.get, f"checkpoint {self.path} ({name})")

    def close(self) -> None:
        self.file.close()


_META_FIELDS = ("format_version", "step", "has_ema", "optimizer", "scheduler", "extra")
#: read_checkpoint without a model to compare with: the cap safetensors itself applies
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Decode a checkpoint into plain state dicts without touching any object.

    Returns:
        dict with ``step``, ``model`` (state dict), ``ema`` (state dict or None),
        ``optimizer``, ``scheduler`` (state dicts or None), ``extra``, ``rng`` (torch's
        state or None), ``cuda_rng`` (list), ``generators`` (name -> state).

    Raises:
        FileNotFoundError: no such file.
        SerializationError: not a regular file, not a valid safetensors file, not a tinydiff
            checkpoint, or malformed metadata.
    """
    ckpt = _Checkpoint(path, _MAX_HEADER_BYTES, map_location)
    try:
        return _read_all(ckpt)
    finally:
        ckpt.close()


def _read_all(ckpt: _Checkpoint) -> dict[str, Any]:
    def section(prefix: str) -> dict[str, Tensor]:
        return {name: ckpt.get(key) for name, key in ckpt.section(prefix).items()}

    cuda = section("rng/cuda/")
    if not all(k.isdigit() for k in cuda):
        raise SerializationError(f"checkpoint {ckpt.path}: malformed rng/cuda/ tensor names")
    return {
        "step": ckpt.meta["step"],
        "model": section("model/"),
        "ema": section("ema/") if ckpt.meta["has_ema"] else None,
        "optimizer": ckpt.decode("optimizer"),
        "scheduler": ckpt.decode("scheduler"),
        "extra": ckpt.decode("extra"),
        "rng": ckpt.get("rng/torch") if "rng/torch" in ckpt.file.entries else None,
        "cuda_rng": [cuda[k] for k in sorted(cuda, key=int)],
        "generators": section("rng/gen/"),
    }


def _check_rng_state(ckpt: _Checkpoint, key: str, like: Tensor, what: str) -> None:
    dtype, shape = ckpt.file.entries[key]
    if dtype != "U8" or shape != tuple(like.shape):
        raise SerializationError(
            f"checkpoint {ckpt.path}: {what} {key} is {dtype} {list(shape)}, expected a uint8 "
            f"tensor of shape {list(like.shape)}; it was not saved from this kind of generator"
        )


def _trial_load_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: str) -> None:
    """Load ``state`` into a twin of ``optimizer`` over meta-device parameters first."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise SerializationError(f"{where}: the optimizer state has no param_groups list")
    saved = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in state["param_groups"]]
    live = [len(g["params"]) for g in optimizer.param_groups]
    if saved != live:
        raise SerializationError(
            f"{where}: the optimizer state has parameter groups of sizes {saved}, the optimizer "
            f"given has {live}; build the optimizer over the same parameters as when saving"
        )
    try:
        groups = [
            {**g, "params": [torch.empty_like(p, device="meta") for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        twin = type(optimizer)(groups, **optimizer.defaults)
    except Exception:  # an optimizer that cannot be rebuilt this way: sizes were checked
        return
    try:
        twin.load_state_dict(state)
    except Exception as err:
        raise SerializationError(
            f"{where}: the optimizer state does not load into a {type(optimizer).__name__} "
            f"({type(err).__name__}: {err})"
        ) from None


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
    """Restore what :func:`save_checkpoint` wrote into the given objects, atomically.

    Everything is validated before any object changes: the file (a regular file, a valid
    safetensors file with tinydiff metadata), the names, shapes and dtypes of the model's
    and the EMA's tensors (float tensors may load into another float precision, never into
    integer ones), the EMA counters, the optimizer state (loaded first into a twin of the
    optimizer on the meta device), the scheduler's fields, the generators' states. On an
    error nothing was restored.

    Args:
        path: the checkpoint file.
        model: receives the model state (``load_state_dict(strict=strict)``).
        optimizer: optional; restored if given (error if absent from the file).
        scheduler: optional LR scheduler; restored if given (error if absent from the file).
        ema: optional EMA; default: the model's own EMA if enabled. A checkpoint with an
            EMA for a model without one (or the reverse) is an error.
        generators: named generators to restore (names must be in the file).
        restore_rng: restore torch's global RNG states.
        strict: model keys must match exactly (shapes and dtypes are always checked).

    Returns:
        the saved step.

    Raises:
        FileNotFoundError: no such file.
        SerializationError: anything wrong with the file or inconsistent with the objects;
            the message names the file and the mismatch.
    """
    step, _ = restore_checkpoint(
        path,
        model,
        optimizer,
        scheduler,
        ema,
        generators=generators,
        restore_rng=restore_rng,
        strict=strict,
    )
    return step


def restore_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    ema: Any | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
    exact: bool = False,
    check_extra: Callable[[Any, int], Any] | None = None,
) -> tuple[int, Any]:
    """`load_checkpoint` for a caller that also restores the ``extra`` section.

    The file is opened once; ``check_extra(extra, step)`` runs on the decoded ``extra``
    after every other check and before anything changes, and may raise to refuse the file.

    Args:
        exact: the file holds optimizer / scheduler state exactly when one is given here
            (otherwise state the caller does not restore is ignored).
        check_extra: validates (and converts) ``extra``; its result is returned.

    Returns:
        ``(step, check_extra(extra, step))`` (``(step, None)`` without ``check_extra``).
    """
    if ema is None and getattr(model, "ema", None) is not None:
        ema = model.ema
    model_state = model.state_dict()
    n = len(model_state) * (2 + (4 if optimizer is not None else 0)) + len(generators or {})
    ckpt = _Checkpoint(path, (1 << 20) + 2048 * (n + 64), "cpu")
    try:
        return _restore(
            ckpt,
            model,
            model_state,
            optimizer,
            scheduler,
            ema,
            generators or {},
            restore_rng,
            strict,
            exact,
            check_extra,
        )
    finally:
        ckpt.close()


def _restore(
    ckpt: _Checkpoint,
    model: nn.Module,
    model_state: dict[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    ema: Any | None,
    generators: dict[str, torch.Generator],
    restore_rng: bool,
    strict: bool,
    exact: bool,
    check_extra: Callable[[Any, int], Any] | None,
) -> tuple[int, Any]:
    """Check the whole file against the objects and read it, then restore them all."""
    meta = ckpt.meta
    if exact:
        _check_nothing_dropped(ckpt, optimizer, scheduler)
    # -- validate everything -------------------------------------------------------------
    model_keys = ckpt.section("model/")
    check_entries(
        model_state,
        ckpt.file,
        model_keys,
        what="model",
        strict=strict,
        exact_dtype=False,
        hint="Build the model with the architecture it was saved from.",
    )
    ema_keys = _check_ema(ckpt, ema)
    decoded = _decode_training_state(ckpt, optimizer, scheduler)
    gen_keys, torch_key, cuda_keys = _rng_keys(ckpt, generators, restore_rng)
    # read every tensor before changing anything (a read can still fail on a bad file)
    model_tensors = {name: ckpt.get(key) for name, key in model_keys.items()}
    ema_tensors = {name: ckpt.get(key) for name, key in ema_keys.items()} if ema else {}
    gen_states = {name: ckpt.get(gen_keys[name]) for name in generators}
    torch_state = ckpt.get(torch_key) if torch_key is not None else None
    cuda_states = [ckpt.get(key) for key in cuda_keys]
    extra = check_extra(ckpt.decode("extra"), meta["step"]) if check_extra is not None else None
    # -- mutate ------------------------------------------------------------------------------
    model.load_state_dict(model_tensors, strict=strict)
    if ema is not None:
        ema.load_state_dict(ema_tensors)
    if optimizer is not None:
        optimizer.load_state_dict(decoded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(decoded["scheduler"])
    for name, gen in generators.items():
        gen.set_state(gen_states[name])
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    step: int = meta["step"]
    return step, extra


def _holds_state(path: str | os.PathLike[str], name: str) -> bool:
    """Whether the checkpoint at ``path`` holds ``name`` (``"optimizer"``, ``"scheduler"``)
    state; reads the header only. Raises what `read_checkpoint` raises on a bad file."""
    ckpt = _Checkpoint(path, _MAX_HEADER_BYTES, "cpu")
    try:
        return ckpt.meta[name] is not None
    finally:
        ckpt.close()


def _check_nothing_dropped(
    ckpt: _Checkpoint, optimizer: torch.optim.Optimizer | None, scheduler: Any | None
) -> None:
    """Refuse optimizer or scheduler state in the file that nothing was given to restore."""
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None and ckpt.meta[name] is not None:
            raise SerializationError(
                f"checkpoint {ckpt.path} holds {name} state but no {name} was given to restore "
                f"it into; pass the same kind of {name} as when saving (its state would "
                "otherwise be silently dropped)"
            )


def _check_ema(ckpt: _Checkpoint, ema: Any | None) -> dict[str, str]:
    """Check the file's EMA section against ``ema``; returns its entries' keys."""
    where = f"checkpoint {ckpt.path}"
    has_ema = ckpt.meta["has_ema"]
    ema_keys = ckpt.section("ema/")
    if (ema is None) == has_ema:
        raise SerializationError(
            f"EMA mismatch: {where} {'has' if has_ema else 'has no'} EMA state but "
            f"{'no' if ema is None else 'an'} EMA was given; call model.enable_ema(...) before "
            "loading (or disable it) to match"
        )
    if ema is not None:
        check_entries(
            ema.state_dict(),
            ckpt.file,
            ema_keys,
            what="EMA",
            exact_dtype=False,
            hint="Enable the EMA on a model of the architecture it was saved from.",
        )
        check_count(ckpt.file, "ema/n_averaged", 1)
        check_count(ckpt.file, "ema/num_calls", 0)
    return ema_keys


def _decode_training_state(
    ckpt: _Checkpoint, optimizer: torch.optim.Optimizer | None, scheduler: Any | None
) -> dict[str, Any]:
    """Decode the optimizer and scheduler states to restore and check that they fit."""
    where = f"checkpoint {ckpt.path}"
    decoded: dict[str, Any] = {}
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if ckpt.meta[name] is None:
            raise SerializationError(
                f"{where} holds no {name} state; pass {name}=None or load a checkpoint saved "
                f"with one"
            )
        decoded[name] = ckpt.decode(name)
    if optimizer is not None:
        _trial_load_optimizer(optimizer, decoded["optimizer"], where)
    if scheduler is not None:
        live = set(scheduler.state_dict())
        saved = decoded["scheduler"]
        if not isinstance(saved, dict) or set(saved) != live:
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise SerializationError(
                f"{where}: the scheduler state has fields {got}, a {type(scheduler).__name__} "
                f"has {sorted(live)}; pass the same kind of scheduler as when saving"
            )
    return decoded


def _rng_keys(
    ckpt: _Checkpoint, generators: dict[str, torch.Generator], restore_rng: bool
) -> tuple[dict[str, str], str | None, list[str]]:
    """Check the RNG states to restore; returns the keys of the generators' states (by name),
    of torch's (None: not restored) and of the CUDA devices' (in device order; [])."""
    where = f"checkpoint {ckpt.path}"
    gen_keys = ckpt.section("rng/gen/")
    for name, gen in generators.items():
        if name not in gen_keys:
            raise SerializationError(
                f"{where} holds no generator named {name!r} (it has: "
                f"{', '.join(sorted(gen_keys)) or 'none'})"
            )
        _check_rng_state(ckpt, gen_keys[name], gen.get_state(), f"generator {name!r}")
    restore_torch = restore_rng and "rng/torch" in ckpt.file.entries
    if restore_torch:
        _check_rng_state(ckpt, "rng/torch", torch.get_rng_state(), "the torch RNG state")
    cuda_keys = ckpt.section("rng/cuda/")
    restore_cuda = restore_rng and bool(cuda_keys) and torch.cuda.is_available()
    if restore_cuda and (
        sorted(cuda_keys, key=lambda k: int(k) if k.isdigit() else -1)
        != [str(i) for i in range(len(cuda_keys))]
        or len(cuda_keys) > torch.cuda.device_count()
    ):
        raise SerializationError(
            f"{where}: CUDA RNG states for devices {sorted(cuda_keys)}, but this machine has "
            f"{torch.cuda.device_count()}; pass restore_rng=False"
        )
    cuda_order = [cuda_keys[str(i)] for i in range(len(cuda_keys))] if restore_cuda else []
    return gen_keys, "rng/torch" if restore_torch else None, cuda_order
