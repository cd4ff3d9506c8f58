"""tinydiff: small, fast and exact diffusion models in PyTorch.

Public API::

    from tinydiff import DiffusionModel, DiffusionModelConfig

Plugin registries (each with ``register``, ``get``, ``names``): :mod:`tinydiff.schedules`,
:mod:`tinydiff.targets`, :mod:`tinydiff.variances`, :mod:`tinydiff.losses`,
:mod:`tinydiff.samplers`, :mod:`tinydiff.spacings`.
"""

from tinydiff import losses, samplers, schedules, spacings, targets, variances
from tinydiff._registry import load_plugins
from tinydiff._version import __version__
from tinydiff.config import DiffusionModelConfig
from tinydiff.model import DiffusionModel

__all__ = [
    "DiffusionModel",
    "DiffusionModelConfig",
    "__version__",
    "load_plugins",
    "losses",
    "samplers",
    "schedules",
    "spacings",
    "targets",
    "variances",
]
