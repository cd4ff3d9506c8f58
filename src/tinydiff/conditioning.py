r"""Conditioning and classifier-free guidance (Ho & Salimans 2022).

**Conditioning contract.** ``cond`` is a dict of keyword arguments passed through to the
network: ``nn_module(x_t, t, **cond)``. Tensor values have leading dimension bsz (one row
per sample); other values (flags, ints) are passed unchanged. Keys are checked against the
network's ``forward`` signature (a network taking ``**kwargs`` accepts any key).

**Null-condition contract** (used by conditioning dropout and by guidance), first match wins:

1. the network defines ``null_cond(cond) -> cond``: it returns the "no condition" version
   of ``cond`` with the same keys and tensor shapes;
2. the network has an int attribute ``null_class`` and every tensor in ``cond`` is under
   the key ``class_labels``: the labels are replaced by ``null_class`` (the convention of
   :mod:`tinydiff.nn`: label index ``num_classes`` means "unconditional").

Otherwise dropping or guidance raises a ``ValueError`` saying how to provide one.

**Guidance.** With the conditional and unconditional predictions computed in one forward
pass of 2 bsz rows, the guided estimates are

.. math::
    \hat x_0 = \hat x_0^{u} + w(\hat x_0^{c} - \hat x_0^{u}),\qquad
    \hat\epsilon = \hat\epsilon^{u} + w(\hat\epsilon^{c} - \hat\epsilon^{u}),

so w = 0 is unconditional, w = 1 conditional, w > 1 guided. Both are the same affine
combination (weights 1 - w and w), so :math:`x_t = \alpha\hat x_0 + \sigma\hat\epsilon`
still holds, and for every affine target (eps, x0, v) this
equals guiding the raw network output. Guidance rescale (Lin et al. 2024, sec. 3.4) with
factor :math:`\phi` rescales the guided x0 to the conditional x0's standard deviation (per
sample, over all non-batch dims), :math:`\hat x_0 \leftarrow \phi\,\hat x_0\,\sigma_c/\sigma_g
+ (1-\phi)\hat x_0`, and recomputes eps from x_t so the pair stays consistent.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "accepted_cond_keys",
    "apply_guidance",
    "check_cond",
    "concat_cond",
    "drop_cond",
    "dropout",
    "null_cond",
]

Cond = dict[str, Any]


def accepted_cond_keys(network: nn.Module) -> set[str] | None:
    """Keyword names ``network.forward`` accepts after (x_t, t); None if it takes **kwargs."""
    try:
        params = list(inspect.signature(network.forward).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]}  # x_t and t
    return {
        p.name
        for p in params
        if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_cond(network: nn.Module, cond: Any, bsz: int, device: torch.device | None = None) -> Cond:
    """Validate ``cond`` for a batch of ``bsz`` samples; returns it as a plain dict (its
    tensors moved to ``device`` when one is given).

    Raises:
        TypeError: cond is not a dict with str keys.
        ValueError: a key the network's forward does not accept (named in the message), or
            a tensor whose leading dimension is not bsz.
    """
    if not isinstance(cond, Mapping):
        raise TypeError(
            f"cond must be a dict of keyword arguments for the network, got {type(cond).__name__}"
        )
    cond = dict(cond)
    accepted = accepted_cond_keys(network)
    for key, value in cond.items():
        if not isinstance(key, str):
            raise TypeError(f"cond keys must be str, got {key!r}")
        if accepted is not None and key not in accepted:
            raise ValueError(
                f"cond key {key!r} is not accepted by {type(network).__name__}.forward; "
                f"accepted keyword arguments: {sorted(accepted) or 'none'}"
            )
        if isinstance(value, Tensor) and (value.dim() == 0 or value.shape[0] != bsz):
            raise ValueError(
                f"cond[{key!r}] must have leading dimension bsz = {bsz}, "
                f"got shape {tuple(value.shape)}"
            )
    if device is not None:
        cond = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}
    return cond


def null_cond(network: nn.Module, cond: Cond) -> Cond:
    """The network's "no condition" version of ``cond`` (module docstring), same shapes.

    Raises:
        ValueError: the network has no way to express the null condition.
    """
    custom = getattr(network, "null_cond", None)
    if callable(custom):
        out = custom(dict(cond))
        if not isinstance(out, Mapping) or set(out) != set(cond):
            raise ValueError(
                f"{type(network).__name__}.null_cond must return a dict with the keys "
                f"{sorted(cond)}, got {out!r:.200}"
            )
        return dict(out)
    null_class = getattr(network, "null_class", None)
    tensor_keys = {k for k, v in cond.items() if isinstance(v, Tensor)}
    if isinstance(null_class, int) and not isinstance(null_class, bool):
        if tensor_keys <= {"class_labels"}:
            out = dict(cond)
            if "class_labels" in cond:
                out["class_labels"] = torch.full_like(cond["class_labels"], null_class)
            return out
    raise ValueError(
        f"cond_drop_prob > 0 and guidance need a null condition, but {type(network).__name__} "
        f"defines neither null_cond(cond) -> cond nor (for cond={{'class_labels': ...}} only) "
        f"an int attribute null_class; cond keys: {sorted(cond)}. Add one of them to the network."
    )


def drop_cond(network: nn.Module, cond: Cond, drop: Tensor) -> Cond:
    """Replace the condition of the samples where ``drop`` (bool, (bsz,)) is True by null.

    Non-tensor values must be equal in ``cond`` and its null version (they cannot vary
    per sample).
    """
    null = null_cond(network, cond)
    out: Cond = {}
    for key, value in cond.items():
        nv = null[key]
        if isinstance(value, Tensor):
            if not isinstance(nv, Tensor) or nv.shape != value.shape:
                raise ValueError(f"null_cond changed the shape of cond[{key!r}]")
            mask = drop.to(value.device).view((-1,) + (1,) * (value.dim() - 1))
            out[key] = torch.where(mask, nv.to(value.dtype), value)
        else:
            if nv is not value and nv != value:
                raise ValueError(
                    f"cond[{key!r}] is not a tensor, so it cannot be dropped per sample; "
                    "make it a tensor with leading dimension bsz"
                )
            out[key] = value
    return out


def dropout(
    network: nn.Module,
    cond: Cond | None,
    prob: float,
    mask: Tensor | None,
    bsz: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Cond | None:
    """Conditioning dropout for classifier-free guidance training (Ho & Salimans 2022).

    Each sample's condition is replaced by the null condition where ``mask`` is True, or,
    without a mask, with probability ``prob`` (one uniform draw per sample from
    ``generator`` on ``device``).

    Args:
        network: the network (defines the null condition).
        cond: the checked condition, or None.
        prob: the dropout probability p in [0, 1].
        mask: optional bool (bsz,), True where the condition is dropped; overrides p.
        bsz: the batch size.
        generator: source of the draw.
        device: where to draw.

    Raises:
        ValueError: a mask of the wrong dtype or shape, or a mask without a cond.
    """
    if cond is None:
        if mask is not None:
            raise ValueError("cond_drop_mask was given without a cond to drop")
        return None
    if mask is None and prob > 0:
        mask = torch.rand(bsz, generator=generator, device=device) < prob
    if mask is None:
        return cond
    if mask.shape != (bsz,) or mask.dtype != torch.bool:
        raise ValueError(
            f"cond_drop_mask must be a bool tensor of shape ({bsz},), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return drop_cond(network, cond, mask)


def concat_cond(first: Cond, second: Cond) -> Cond:
    """Stack two conditions of bsz rows each into one of 2 bsz rows (tensors concatenated)."""
    out: Cond = {}
    for key, value in first.items():
        other = second[key]
        if isinstance(value, Tensor):
            out[key] = torch.cat([value, other.to(value.dtype)])
        else:
            if other is not value and other != value:
                raise ValueError(
                    f"cond[{key!r}] is not a tensor and differs from its null version; "
                    "make it a tensor with leading dimension bsz"
                )
            out[key] = value
    return out


def apply_guidance(
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    cond_pred: tuple[Tensor, Tensor],
    uncond_pred: tuple[Tensor, Tensor],
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Classifier-free guidance on (x0, eps) pairs (module docstring).

    Args:
        x_t: (bsz, *input_shape).
        alpha: the process's alpha at x_t's time, broadcastable against x_t.
        sigma: its sigma there, broadcastable against x_t.
        cond_pred: conditional (x0_hat, eps_hat), each x_t's shape.
        uncond_pred: unconditional (x0_hat, eps_hat), each x_t's shape.
        guidance_scale: w.
        guidance_rescale: phi in [0, 1] (Lin et al. 2024, sec. 3.4); 0 disables.

    Returns:
        guided (x0_hat, eps_hat).
    """
    x0_c, eps_c = cond_pred
    x0_u, eps_u = uncond_pred
    x0 = x0_u + guidance_scale * (x0_c - x0_u)
    eps = eps_u + guidance_scale * (eps_c - eps_u)
    if guidance_rescale > 0:
        dims = tuple(range(1, x_t.dim()))
        std_c = x0_c.std(dim=dims, keepdim=True, unbiased=False)
        std_g = x0.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1e-12)
        x0 = guidance_rescale * x0 * (std_c / std_g) + (1 - guidance_rescale) * x0
        eps = (x_t - alpha * x0) / sigma.clamp_min(1e-10)
    return x0, eps
