r"""The denoiser: a network, its prediction target and conditioning, seen as :math:`D(x_t, t)`.

Everything that calls the network goes through :class:`Denoiser`: sampling (eager and
compiled alike), the likelihood, the training loss and the tests. It

1. forms the network input with the target's :meth:`~tinydiff.targets.Target.network_input`
   (the raw (x_t, t) for eps / x0 / v; scaled for preconditioned targets), times in float32
   (float64 for float64 x: t up to T must stay exact);
2. calls ``network(x_in, t_in, **cond)`` and checks the output's shape (``channel_multiplier``
   times the channels for a variance type with extra channels);
3. converts the output into :class:`Prediction` (x0_hat, eps_hat, variance channels);
4. applies classifier-free guidance (Ho & Salimans 2022) with optional rescale (Lin et al.
   2024, sec. 3.4) on (x0, eps): the conditional and unconditional rows go through the network
   in one batch of 2 bsz.

Samplers call ``denoiser(x, point)`` with ``point`` a row of the plan's ``point`` column
(:func:`tinydiff.process.GaussianProcess.points`): the network time and the process
coefficients there, so they never need to know what the network was trained to predict
(k-diffusion's denoiser-wrapper idea, Karras et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tinydiff import conditioning, variances
from tinydiff.process import Point
from tinydiff.targets import Target
from tinydiff.variances import Variance

__all__ = ["Denoiser", "Prediction", "network_time_dtype"]


class Prediction(NamedTuple):
    """The denoiser's output at one (x_t, t).

    Attributes:
        x0: estimate of the clean data, x's shape.
        eps: estimate of the noise, x's shape.
        var_out: the network's variance channels (``learned_range``), or None.
    """

    x0: Tensor
    eps: Tensor
    var_out: Tensor | None


def network_time_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the times handed to the network: float64 for float64 x, else float32
    (never half precision: t up to T must stay exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Denoiser:
    """The model as samplers see it: ``denoiser(x_t, point) -> Prediction``.

    Args:
        network: called as ``network(x_in, t_in, **cond)``; any callable module.
        target: the prediction target (converts the output to (x0, eps)).
        variance: the variance type (splits off its channels).
        cond: keyword arguments of the network, tensors with leading dim bsz, or None.
        guidance_scale: w of classifier-free guidance (needs ``cond`` and a network with a null
            condition, see :mod:`tinydiff.conditioning`); None: no guidance.
        guidance_rescale: phi in [0, 1]; 0 disables.
        null_source: the module that defines the null condition (default: ``network``); set it
            when ``network`` is a wrapper (compiled sampling).

    Raises:
        ValueError: guidance without cond; a network without a null condition.
    """

    def __init__(
        self,
        network: nn.Module | Callable[..., Tensor],
        target: Target,
        variance: Variance,
        *,
        cond: Mapping[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_source: Any = None,
    ) -> None:
        self.network = network
        self.target = target
        self.variance = variance
        self.channel_multiplier = int(getattr(variance, "channel_multiplier", 1))
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.cond: dict[str, Any] | None = None if cond is None else dict(cond)
        if guidance_scale is not None:
            if cond is None:
                raise ValueError(
                    "guidance_scale was given without cond: classifier-free guidance needs the "
                    "condition to guide towards, e.g. cond={'class_labels': labels}"
                )
            source: Any = network if null_source is None else null_source
            self.cond = conditioning.concat_cond(
                dict(cond), conditioning.null_cond(source, dict(cond))
            )

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is applied."""
        return self.guidance_scale is not None

    def forward_network(self, x_t: Tensor, p: Point) -> tuple[Tensor, Tensor | None]:
        """The raw network output at x_t, split into (model_out, var_out), in x_t's dtype.

        ``cond`` must already have x_t's batch size (it is the doubled one under guidance).

        Raises:
            ValueError: the network returned something other than a tensor of the expected
                shape.
        """
        x_in, t_in = self.target.network_input(x_t, p)
        bsz = x_t.shape[0]
        t_in = t_in.reshape(-1).expand(bsz) if t_in.dim() <= 1 else t_in.reshape(bsz)
        out = (
            self.network(x_in, t_in) if self.cond is None else self.network(x_in, t_in, **self.cond)
        )
        expected = (bsz, x_t.shape[1] * self.channel_multiplier, *x_t.shape[2:])
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            name = variances.REGISTRY.name_of(type(self.variance)) or type(self.variance).__name__
            extra = (
                f" (variance_type={name!r} needs {self.channel_multiplier}x the input channels "
                "on dim 1: the mean channels then the variance channels)"
                if self.channel_multiplier != 1
                else ""
            )
            raise ValueError(f"nn_module returned {got}; expected shape {expected}{extra}")
        return self.variance.split(out.to(x_t.dtype))

    def __call__(self, x: Tensor, point: Tensor, alpha_bar: Tensor | None = None) -> Prediction:
        """Denoise x (bsz, *input_shape) at ``point`` ((5,) or (bsz, 5), see the module doc).

        ``denoise(x, t, alpha_bar)`` (a 0-dim time and alpha_bar) is the tinydiff 0.1 form
        that samplers written for it use; it describes variance-preserving processes only.
        """
        if alpha_bar is not None:
            zero = torch.zeros_like(alpha_bar)
            point = torch.stack(
                [point.to(alpha_bar.dtype), alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), zero, zero]
            )
        p = Point.of(point, x)
        if self.guidance_scale is None:
            model_out, var_out = self.forward_network(x, p)
            x0, eps = self.target.to_x0_eps(model_out, x, p)
            return Prediction(x0, eps, var_out)
        bsz = x.shape[0]
        x2 = torch.cat([x, x])
        p2 = p if point.dim() == 1 else Point.of(torch.cat([point, point]), x2)
        model_out, var_out = self.forward_network(x2, p2)
        x0_2, eps_2 = self.target.to_x0_eps(model_out, x2, p2)
        x0, eps = conditioning.apply_guidance(
            x,
            p.alpha,
            p.sigma,
            (x0_2[:bsz], eps_2[:bsz]),
            (x0_2[bsz:], eps_2[bsz:]),
            self.guidance_scale,
            self.guidance_rescale,
        )
        return Prediction(x0, eps, None if var_out is None else var_out[:bsz])
