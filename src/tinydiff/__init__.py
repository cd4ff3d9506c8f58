"""tinydiff: small, fast and exact diffusion models in PyTorch.

Public API::

    from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer
    from tinydiff import EMA, save_checkpoint, load_checkpoint

Plugin registries (each with ``register``, ``get``, ``names``): :mod:`tinydiff.schedules`,
:mod:`tinydiff.targets`, :mod:`tinydiff.variances`, :mod:`tinydiff.losses`,
`tinydiff.samplers`, `tinydiff.spacings`, `tinydiff.guidance`, `tinydiff.objectives`. The core:
`tinydiff.process` (the Gaussian process alpha(t), sigma(t)), `tinydiff.denoiser`
and `tinydiff.sampling` (the sampling loop as a function, with per-step callbacks);
`tinydiff.editing` (SDEdit and inversion). Subpackages that need more
imports load on first access: ``tinydiff.nn``, ``tinydiff.testing``, ``tinydiff.likelihood``,
``tinydiff.hub``, ``tinydiff.metrics``, ``tinydiff.plotting``.
"""

import importlib
from typing import Any

from tinydiff import (
    compat,
    denoiser,
    editing,
    guidance,
    losses,
    objectives,
    posterior,
    process,
    samplers,
    sampling,
    schedules,
    spacings,
    targets,
    variances,
)
from tinydiff._registry import load_plugins
from tinydiff._version import __version__
from tinydiff.checkpoint import load_checkpoint, save_checkpoint
from tinydiff.config import DiffusionModelConfig
from tinydiff.ema import EMA
from tinydiff.model import DiffusionModel
from tinydiff.trainer import Trainer, warmup_cosine

compat.install()  # tinydiff 0.1 components keep working (adapted at registration)

_LAZY = ("nn", "testing", "likelihood", "hub", "metrics", "plotting", "conditioning", "cli")


def __getattr__(name: str) -> Any:
    """``tinydiff.nn`` and the other subpackages of ``_LAZY`` without importing them first."""
    if name in _LAZY:
        return importlib.import_module(f"tinydiff.{name}")
    raise AttributeError(f"module 'tinydiff' has no attribute {name!r}")


__all__ = [
    "EMA",
    "DiffusionModel",
    "DiffusionModelConfig",
    "Trainer",
    "__version__",
    "denoiser",
    "editing",
    "guidance",
    "load_checkpoint",
    "load_plugins",
    "losses",
    "objectives",
    "posterior",
    "process",
    "samplers",
    "sampling",
    "save_checkpoint",
    "schedules",
    "spacings",
    "targets",
    "variances",
    "warmup_cosine",
]
