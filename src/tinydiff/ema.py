r"""Exponential moving average (EMA) of a network's weights, on ``torch.optim.swa_utils``.

The averaged copy is a :class:`torch.optim.swa_utils.AveragedModel` (parameters *and*
buffers averaged, ``use_buffers=True``) whose averaging function is PyTorch's
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`, called with the decay of the current
update. With :math:`\theta_k` the live weights at the k-th EMA update (k = 0, 1, ...):

.. math::
    \bar\theta_0 = \theta_0,\qquad
    \bar\theta_k = d_k\,\bar\theta_{k-1} + (1 - d_k)\,\theta_k,\qquad
    d_k = \min\!\Big(d, \frac{1 + k}{10 + k}\Big)\ \text{(warm-up)}\quad\text{or}\quad d_k = d,

so early, noisy weights are forgotten quickly (d_1 = 2/11, d_10 = 11/20, ...) while the
decay approaches d (the warm-up of Tensorflow's ``ExponentialMovingAverage`` with
``num_updates``). An EMA update happens on every ``update_every``-th call of
:meth:`EMA.update`; k counts the updates, not the calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["EMA", "EMAMixin", "ema_decay"]


def ema_decay(decay: float, k: int, warmup: bool = True) -> float:
    """Decay d_k of the k-th EMA update (k >= 1; module docstring)."""
    return min(decay, (1 + k) / (10 + k)) if warmup else decay


class EMA:
    """An EMA copy of ``module`` that is *not* a submodule of anything.

    Args:
        module: the live network; it is deep-copied once (the copy is the average).
        decay: d in [0, 1].
        warmup: use the warm-up decay schedule (module docstring).
        update_every: average on every n-th call of :meth:`update`.

    Attributes:
        averaged: the :class:`AveragedModel`; ``averaged.module`` is the averaged network,
            callable like the live one.
    """

    def __init__(
        self, module: nn.Module, decay: float = 0.9999, warmup: bool = True, update_every: int = 1
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_every = update_every
        self.num_calls = 0
        self.averaged = AveragedModel(module, multi_avg_fn=self._avg_fn, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.update_parameters(module)  # n_averaged 0 -> 1: a plain copy

    def _avg_fn(
        self,
        ema_params: list[Tensor] | tuple[Tensor, ...],
        params: list[Tensor] | tuple[Tensor, ...],
        n_averaged: Tensor | int,
    ) -> None:
        # the k-th averaging update happens on call k * update_every (no device sync needed)
        k = self.num_calls // self.update_every
        get_ema_multi_avg_fn(ema_decay(self.decay, k, self.warmup))(ema_params, params, n_averaged)

    @property
    def module(self) -> nn.Module:
        """The averaged network."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        """k: the number of averaging updates since the initial copy."""
        return int(self.averaged.n_averaged.item()) - 1

    @torch.no_grad()
    def update(self, module: nn.Module) -> bool:
        """Count a call; on every ``update_every``-th, average ``module``'s weights in.

        Returns:
            whether an update happened.
        """
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return False
        self.averaged.update_parameters(module)
        return True

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only: the averaged network (``module.*``), ``n_averaged``, ``num_calls``."""
        state = {k: v.detach() for k, v in self.averaged.state_dict().items()}
        state["num_calls"] = torch.tensor(self.num_calls, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (weights are copied into place)."""
        state = dict(state)
        if "num_calls" not in state:
            raise ValueError("not an EMA state dict: missing 'num_calls'")
        self.num_calls = int(torch.as_tensor(state.pop("num_calls")).item())
        self.averaged.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, warmup={self.warmup}, update_every={self.update_every}, "
            f"num_updates={self.num_updates})"
        )


class EMAMixin(nn.Module):
    """EMA methods of :class:`tinydiff.DiffusionModel` (a plain-attribute :class:`EMA` of
    ``self.nn_module``, moved by ``.to()`` and switched by ``.train()`` with the model)."""

    _ema: EMA | None
    nn_module: nn.Module

    def enable_ema(
        self, decay: float = 0.9999, *, warmup: bool = True, update_every: int = 1
    ) -> EMA:
        """Start keeping an EMA of the network's weights (from the current weights).

        Call :meth:`update_ema` after each ``optimizer.step()``. The decay of the k-th
        update is ``min(decay, (1 + k) / (10 + k))`` with warm-up, else ``decay``; see
        :mod:`tinydiff.ema`.

        Args:
            decay: d in [0, 1].
            warmup: use the warm-up schedule.
            update_every: average on every n-th call of :meth:`update_ema`.

        Returns:
            the :class:`~tinydiff.ema.EMA` (also :attr:`ema`).
        """
        ema = EMA(self.nn_module, decay, warmup=warmup, update_every=update_every)
        object.__setattr__(self, "_ema", ema)
        ema.averaged.train(self.training)
        return ema

    @property
    def ema(self) -> EMA | None:
        """The EMA, or None if :meth:`enable_ema` was not called."""
        return self._ema

    def _require_ema(self) -> EMA:
        if self._ema is None:
            raise ValueError(
                "EMA is not enabled on this model. A model loaded with from_pretrained has its "
                "saved EMA when the folder holds EMA weights (ema.safetensors; loaded by "
                "default, or with load_ema=True) and it was not loaded with load_ema=False or "
                "use_ema_weights=True (which makes the EMA weights the live ones: sample "
                "without use_ema then). To keep an EMA while training, call "
                "model.enable_ema(decay=...) before training and model.update_ema() after each "
                "optimizer step."
            )
        return self._ema

    def update_ema(self) -> bool:
        """Average the current weights into the EMA (call after ``optimizer.step()``).

        Returns:
            whether an averaging update happened (see ``update_every``).
        """
        return self._require_ema().update(self.nn_module)

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA's state (tensors only; see :meth:`tinydiff.ema.EMA.state_dict`)."""
        return self._require_ema().state_dict()

    def load_ema_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`ema_state_dict`'s output (enable EMA first, with its options)."""
        self._require_ema().load_state_dict(state)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to()/.double()/.cuda() also move the EMA copy, which is not a submodule
        super()._apply(fn, *args, **kwargs)
        if self._ema is not None:
            self._ema.averaged._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        if self._ema is not None:
            self._ema.averaged.train(mode)
        return self
