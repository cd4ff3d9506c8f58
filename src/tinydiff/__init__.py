"""tinydiff: small, fast and exact diffusion models in PyTorch.

Public API::

    from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer
    from tinydiff import EMA, save_checkpoint, load_checkpoint

Plugin registries (each with ``register``, ``get``, ``names``): :mod:`tinydiff.schedules`,
:mod:`tinydiff.targets`, :mod:`tinydiff.variances`, :mod:`tinydiff.losses`,
:mod:`tinydiff.samplers`, :mod:`tinydiff.spacings`.
"""

from tinydiff import losses, samplers, schedules, spacings, targets, variances
from tinydiff._registry import load_plugins
from tinydiff._version import __version__
from tinydiff.checkpoint import load_checkpoint, save_checkpoint
from tinydiff.config import DiffusionModelConfig
from tinydiff.ema import EMA
from tinydiff.model import DiffusionModel
from tinydiff.trainer import Trainer, warmup_cosine

__all__ = [
    "EMA",
    "DiffusionModel",
    "DiffusionModelConfig",
    "Trainer",
    "__version__",
    "load_checkpoint",
    "load_plugins",
    "losses",
    "samplers",
    "save_checkpoint",
    "schedules",
    "spacings",
    "targets",
    "variances",
    "warmup_cosine",
]
