"""tinydiff: diffusion models in PyTorch."""

from tinydiff._version import __version__

__all__ = ["__version__"]
