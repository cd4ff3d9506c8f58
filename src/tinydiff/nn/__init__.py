"""Ready-made denoising networks with time (and class-label) conditioning.

All follow the tinydiff network contract ``net(x_t, t, **cond) -> Tensor``:
``x_t`` has shape ``(bsz, *input_shape)``, ``t`` is a float tensor of shape
``(bsz,)`` on the ``[0, T]`` time scale, and the output has the shape of
``x_t`` with the channel dimension (dim 1) multiplied by ``out_mult``.
"""

from tinydiff.nn.embeddings import SinusoidalTimeEmbedding
from tinydiff.nn.mlp import MLP
from tinydiff.nn.unet import UNet

__all__ = ["MLP", "SinusoidalTimeEmbedding", "UNet"]
