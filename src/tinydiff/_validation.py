"""Checks of user input for :meth:`DiffusionModel.loss`, :meth:`DiffusionModel.sample` and
the samplers' options: plain functions that raise ``TypeError`` / ``ValueError`` saying
what was wrong, what was expected and what to do.

The checks read only Python values and tensor metadata (dtype, shape, device), except
:func:`check_finite` and the range check of :func:`check_loss_times`, which read tensor
values (one host sync on an accelerator each).

`eval_mode` and `in_eval_mode` run a network in eval mode where a model is evaluated
rather than trained (sampling, the likelihood, the timestep search) and give every
submodule its own `training` flag back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_bsz",
    "check_data",
    "check_device",
    "check_dtype_matches",
    "check_finite",
    "check_finite_samples",
    "check_generator",
    "check_int",
    "check_kwargs_dict",
    "check_loss_times",
    "check_noise",
    "check_number",
    "dtype_device",
    "eval_mode",
    "in_eval_mode",
]

#: a single sampling batch may use at most this fraction of the machine's memory per tensor
_MEMORY_FRACTION = 0.5


def check_number(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    finite: bool = True,
    owner: str = "",
) -> float:
    """``value`` as a float, refusing bools, non-numbers, NaN, inf (with ``finite``) and
    values outside ``[min, max]``.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        min, max: inclusive bounds (None: unbounded).
        finite: refuse +-inf as well as NaN.
        owner: who takes the argument (e.g. ``"ddim"``), for the message.

    Returns:
        ``float(value)``.
    """
    who = f"{owner} " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{who}{name} must be a real number, got {value!r} ({type(value).__name__})"
        )
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{who}{name} must be a finite number, got {value!r}")
    if min is not None and not v >= min:
        raise ValueError(f"{who}{name} must be >= {min}, got {value!r}")
    if max is not None and not v <= max:
        raise ValueError(f"{who}{name} must be <= {max}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, min: int, max: int | None = None, owner: str = "") -> int:
    """``value`` as an int in ``[min, max]``; bools, floats and strings are a TypeError."""
    who = f"{owner} needs " if owner else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}{name} as an int, got {value!r} ({type(value).__name__})")
    if value < min or (max is not None and value > max):
        bounds = f">= {min}" if max is None else f"in {min}..{max}"
        raise ValueError(f"{who}{name} {bounds}, got {name}={value}")
    return int(value)


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    """None or a :class:`torch.Generator`; anything else (e.g. a seed) is a TypeError."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    hint = (
        f"; for a seed use {name}=torch.Generator().manual_seed({generator!r})"
        if isinstance(generator, int) and not isinstance(generator, bool)
        else ""
    )
    raise TypeError(
        f"{name} must be a torch.Generator or None, got {type(generator).__name__}{hint}"
    )


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """None, or a device that exists here (``"cpu"``, ``"cuda:0"`` ... a torch.device)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"{name} must be a str or torch.device (e.g. 'cpu', 'cuda:0'), got "
            f"{type(device).__name__}"
        )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"{name}={device!r} is not a device name; expected e.g. 'cpu', 'cuda', 'cuda:1', 'mps'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}={device!r} but CUDA is not available here (no GPU, or torch was built "
                "without CUDA); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r} but MPS is not available here; use device='cpu'")
    return dev


def check_kwargs_dict(name: str, value: Any) -> dict[str, Any] | None:
    """None or a mapping with str keys (a copy); anything else is a TypeError."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a dict of keyword arguments (e.g. {{'eta': 0.5}}) or None, got "
            f"{type(value).__name__} {value!r:.60}"
        )
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name} keys must be str option names, got {bad[:5]!r}")
    return dict(value)


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def check_bsz(
    bsz: Any,
    sample_shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    name: str = "bsz",
) -> int:
    """A positive int batch size whose (bsz, *sample_shape) tensor fits in half the memory.

    Raises:
        ValueError: not an int (bools refused) or < 1, or one batch tensor would need more than
            half the device's memory.
    """
    if isinstance(bsz, bool) or not isinstance(bsz, int) or bsz < 1:
        raise ValueError(f"{name} must be a positive int, got {bsz!r} ({type(bsz).__name__})")
    nbytes = bsz * math.prod(sample_shape) * torch.empty((), dtype=dtype).element_size()
    total = _memory_bytes(device)
    limit = int(total * _MEMORY_FRACTION) if total is not None else 2**62
    if nbytes > limit:
        where = (
            f"{total / 2**30:.1f} GiB of {device.type} memory" if total else "addressable memory"
        )
        raise ValueError(
            f"{name}={bsz} is too large: one ({name}, *{tuple(sample_shape)}) {dtype} tensor needs "
            f"{nbytes / 2**30:.3g} GiB, more than half of the {where}; draw the samples in "
            "smaller batches"
        )
    return bsz


def check_loss_times(
    t: Any, num_timesteps: int, bsz: int, device: torch.device, *, allow_real: bool = False
) -> Tensor:
    """Training times for :meth:`DiffusionModel.loss`: an int64 tensor (bsz,) in 1..T, or
    with ``allow_real`` also a floating-point tensor of real times in (0, T].

    Accepts an integer tensor (not bool or uint8, which torch would use as a mask), a
    Python int (broadcast to the batch) or a list/tuple of ints.
    """
    expected = f"integer times in 1..{num_timesteps} (T = num_timesteps), shape ({bsz},)"
    if allow_real:
        expected += f", or a float tensor of real times in (0, {num_timesteps}]"
    if allow_real and isinstance(t, Tensor) and t.is_floating_point():
        if tuple(t.shape) != (bsz,):
            raise ValueError(f"t must be {expected}, got shape {tuple(t.shape)}")
        t = t.to(device)
        bad = ~torch.isfinite(t) | (t <= 0) | (t > num_timesteps)
        if bool(bad.any()):
            raise ValueError(
                f"t must be {expected}; real times must lie in (0, {num_timesteps}], got "
                f"{t[bad][0].item()!r}"
            )
        return t
    if isinstance(t, bool) or (
        isinstance(t, (list, tuple)) and any(isinstance(v, bool) for v in t)
    ):
        raise TypeError(f"t must be {expected}, got a bool")
    if isinstance(t, int):
        t = torch.full((bsz,), t, dtype=torch.int64, device=device)
    elif isinstance(t, (list, tuple)):
        if not all(isinstance(v, int) for v in t):
            raise TypeError(f"t must be {expected}, got a list holding {t!r:.80}")
        t = torch.tensor(t, dtype=torch.int64, device=device)
    elif not isinstance(t, Tensor):
        raise TypeError(f"t must be {expected}, got {type(t).__name__}")
    if t.dtype in (torch.bool, torch.uint8) or t.is_floating_point() or t.is_complex():
        hint = " (bool and uint8 tensors index as masks)" if not t.is_floating_point() else ""
        raise TypeError(f"t must be {expected}, got dtype {t.dtype}{hint}; use t.long()")
    if tuple(t.shape) != (bsz,):
        raise ValueError(f"t must be {expected}, got shape {tuple(t.shape)}")
    if t.device != device:
        t = t.to(device)
    lo, hi = int(t.min()), int(t.max())
    if lo < 1 or hi > num_timesteps:
        raise ValueError(
            f"t must be {expected}, got values in [{lo}, {hi}]; t = 0 is the clean data and has "
            "no loss, and negative or larger times are outside the schedule"
        )
    return t.long()


def dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a module's first floating-point parameter or buffer (the
    default dtype on the CPU for a module without one)."""
    for p in [*module.parameters(), *module.buffers()]:
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def check_data(x: Any, input_shape: Sequence[int], name: str = "x") -> Tensor:
    """``x`` if it is a floating-point batch (bsz >= 1, *input_shape), else a clear error.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong shape or an empty batch.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    shape = tuple(input_shape)
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name} must have shape (bsz, *input_shape) = (bsz, "
            f"{', '.join(map(str, shape))}), got {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample, got batch size 0")
    return x


def check_noise(
    noise: Tensor | None, x: Tensor, generator: torch.Generator | None, enabled: bool | None
) -> Tensor:
    """The loss's eps: a draw of N(0, I) like x from ``generator``, or ``noise`` checked for
    x's shape and (see `check_finite`) finite values."""
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if not isinstance(noise, Tensor) or noise.shape != x.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {got}")
    check_finite("noise", noise, enabled)
    return noise


def check_dtype_matches(x: Tensor, param_dtype: torch.dtype, name: str = "x") -> None:
    """x's floating dtype must be the network's parameter dtype (unless autocast is on)."""
    if x.dtype == param_dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype} but the network's parameters are {param_dtype}: cast the "
        f"input ({name}.to({param_dtype})) or the model (model.to({x.dtype})), or run under "
        "torch.autocast"
    )


def check_finite(name: str, tensor: Tensor | None, enabled: bool | None = None) -> None:
    """Raise ValueError if ``tensor`` holds NaN or inf; None passes.

    Args:
        name: the input's name, for the message.
        tensor: the tensor.
        enabled: True: always check (one host sync on an accelerator); False: never;
            None (the default of ``loss`` / ``sample``): only where it costs no host sync,
            i.e. for CPU tensors.
    """
    if tensor is None or not tensor.is_floating_point() or enabled is False:
        return
    if enabled is None and tensor.device.type != "cpu":
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        n = int(bad.sum())
        nan = int(torch.isnan(tensor).sum())
        raise ValueError(
            f"{name} holds non-finite values ({nan} NaN, {n - nan} inf of {tensor.numel()}); "
            "check the data and the arguments that produced it (pass check_finite=False to "
            "skip this check)"
        )


def check_finite_samples(samples: Tensor, trajectory: bool, enabled: bool | None = None) -> None:
    """The end-of-sampling check (one host sync, unless ``enabled`` is False): names the
    first non-finite step when the trajectory is there."""
    if enabled is False:
        return
    bad = ~torch.isfinite(samples)
    if not bool(bad.any()):
        return
    if trajectory:
        per_step = bad.flatten(1).any(dim=1)
        first = int(per_step.int().argmax())
        where = "in the initial noise" if first == 0 else f"first after sampling step {first}"
    else:
        where = (
            "in the final samples (pass return_trajectory=True to see the first step where "
            "they appear)"
        )
    raise ValueError(
        f"sampling produced non-finite values (NaN or inf), {where}. Usual causes: a sampler "
        "option out of range, a network that diverged in training (NaN weights), or a "
        "half-precision overflow; pass check_finite=False to return them anyway"
    )


# -- running a network in eval mode ------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Run the block with ``modules`` in eval mode, then give every submodule back its own
    `training` flag (also when the block raises).

    Eval mode is set with each module's own ``train(False)`` (so overrides of `train`, e.g.
    one that also switches an EMA copy, run); the flags are restored by assignment, exactly as
    they were per submodule: a model in train mode with a frozen, eval-mode encoder inside
    comes back that way. Modules given twice or nested are handled once; None is skipped.

    Args:
        modules: the networks (or models) to run in eval mode.
    """
    roots = [m for m in modules if m is not None]
    saved: dict[int, tuple[torch.nn.Module, bool]] = {}
    for root in roots:
        for sub in root.modules():
            saved.setdefault(id(sub), (sub, sub.training))
    if not any(flag for _, flag in saved.values()):
        yield  # already all in eval mode: nothing to change or restore
        return
    try:
        for root in roots:
            root.train(False)
        yield
    finally:
        for sub, flag in saved.values():
            sub.training = flag


_F = TypeVar("_F", bound=Callable[..., Any])


def in_eval_mode(fn: _F) -> _F:
    """Decorate a function or method whose first argument is a model: it runs with the model
    (its network and, when it has one, the EMA copy, which is not a submodule) in eval mode
    (`eval_mode`), so dropout and batch statistics never make a sample depend on whether the
    model was left in train mode."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        ema = getattr(model, "ema", None)
        averaged = getattr(ema, "averaged", None)
        nets = [m for m in (model, averaged) if isinstance(m, torch.nn.Module)]
        with eval_mode(*nets):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
