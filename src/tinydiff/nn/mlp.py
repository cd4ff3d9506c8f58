"""Residual MLP for vector data (2D toy distributions and the like)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tinydiff._validation import check_int, check_number
from tinydiff.nn._limits import MAX_DEPTH, MAX_WIDTH
from tinydiff.nn.embeddings import ConditionEmbedding

__all__ = ["MLP"]


class _ResidualBlock(nn.Module):
    """``h + Linear(Dropout(SiLU(Linear(SiLU(modulate(LayerNorm(h), emb))))))``.

    The conditioning vector enters as a per-feature scale and shift after the
    normalisation (FiLM; Perez et al., 2018), as in the ADM residual block
    (Dhariwal & Nichol, 2021).
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear_1 = nn.Linear(dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(F.silu(emb)).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.linear_1(F.silu(y))
        y = self.linear_2(self.dropout(F.silu(y)))
        out: Tensor = h + y
        return out


class MLP(nn.Module):
    """Time-conditioned residual MLP for vectors.

    ``Linear`` input projection, ``num_layers`` residual blocks (LayerNorm, a
    scale/shift from the time(+label) embedding, SiLU, two Linear layers) and a
    zero-initialised output layer, so an untrained network predicts 0.

    Args:
        input_dim: Number of features ``D`` of each input vector.
        hidden_dim: Width of the residual stream and of the conditioning vector.
        num_layers: Number of residual blocks, at least 1.
        time_embed_dim: Size of the sinusoidal time embedding, at least 2.
        out_mult: Output features per input feature: 1 for a mean/noise
            prediction, 2 for the "learned_range" variance type (output
            ``(bsz, 2 * D)``; split it with ``.chunk(2, dim=1)``).
        num_classes: Number of classes for class conditioning, or ``None``.
            Label ``num_classes`` is the null label for classifier-free guidance.
        dropout: Dropout probability inside the residual blocks.
        end_time: Also take an end time `r` (`net(x, t, r=r)`): a two-time network
            such as MeanFlow's average velocity u(x_t, r, t), with an added embedding of
            `t - r` (see [`ConditionEmbedding`][tinydiff.nn.embeddings.ConditionEmbedding]).
        time_scale: Multiply `t` (and `t - r`) by this before the time embedding; 0.1
            suits MeanFlow (see [`ConditionEmbedding`][tinydiff.nn.embeddings.ConditionEmbedding]).

    Attributes:
        null_class: The null label index (``num_classes``), or ``None``.
        config: The constructor arguments as a JSON-serializable dict; see
            :meth:`from_config`.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        time_embed_dim: int = 64,
        out_mult: int = 1,
        num_classes: int | None = None,
        dropout: float = 0.0,
        end_time: bool = False,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(end_time, bool):
            raise TypeError(f"MLP end_time must be a bool, got {type(end_time).__name__}.")
        for name, value, low, high in (
            ("input_dim", input_dim, 1, MAX_WIDTH),
            ("hidden_dim", hidden_dim, 1, MAX_WIDTH),
            ("num_layers", num_layers, 1, MAX_DEPTH),
            ("time_embed_dim", time_embed_dim, 2, MAX_WIDTH),
            ("out_mult", out_mult, 1, 16),
        ):
            check_int(name, value, min=low, max=high, owner="MLP")
        if num_classes is not None:
            check_int("num_classes", num_classes, min=1, max=MAX_WIDTH, owner="MLP")
        check_number("dropout", dropout, min=0.0, owner="MLP")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP needs 0 <= dropout < 1, got dropout={dropout}.")

        self._config: dict[str, Any] = {
            "input_dim": int(input_dim),
            "hidden_dim": int(hidden_dim),
            "num_layers": int(num_layers),
            "time_embed_dim": int(time_embed_dim),
            "out_mult": int(out_mult),
            "num_classes": None if num_classes is None else int(num_classes),
            "dropout": float(dropout),
        }
        if end_time:  # only then: a one-time network's config reads as before
            self._config["end_time"] = True
        if time_scale != 1.0:
            self._config["time_scale"] = float(time_scale)
        self.end_time = end_time
        self.input_dim = input_dim
        self.out_mult = out_mult
        self.null_class: int | None = num_classes

        self.condition = ConditionEmbedding(
            time_embed_dim, hidden_dim, num_classes, end_time, time_scale
        )
        self.input_proj = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim, dropout) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output = nn.Linear(hidden_dim, input_dim * out_mult)
        for p in self.output.parameters():
            nn.init.zeros_(p)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (a fresh, JSON-serializable dict)."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MLP:
        """Build an (untrained) network from :attr:`config`.

        Args:
            config: A dict of constructor arguments, as in :attr:`config`.

        Returns:
            A new network with the same architecture.
        """
        return cls(**config)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None = None,
        r: Tensor | float | None = None,
    ) -> Tensor:
        """Predict from noisy vectors ``x`` at times ``t`` (and end times ``r``).

        Follows the tinydiff network contract ``net(x_t, t, **cond) -> Tensor``, and
        ``net(x_t, t, r=r, **cond)`` when built with ``end_time=True``.

        Args:
            x: Noisy inputs of shape ``(bsz, input_dim)``, floating point.
            t: Times on the ``[0, T]`` scale (``T = num_timesteps``, default
                1000) of shape ``(bsz,)``; usually integer-valued, fractional
                values are fine. A 0-dim tensor or a Python number is broadcast
                to the whole batch.
            class_labels: Integer labels of shape ``(bsz,)`` in
                ``[0, num_classes]``, where ``num_classes`` is the null label;
                ``None`` means all-null. Only allowed when built with
                ``num_classes``.
            r: End times on the ``[0, T]`` scale, ``(bsz,)`` or 0-dim, ``r <= t``; only
                with ``end_time=True`` (``None``: ``r = t``).

        Returns:
            Tensor of shape ``(bsz, input_dim * out_mult)``: the same shape as
            ``x`` for ``out_mult=1``, ``(bsz, 2 * input_dim)`` for ``out_mult=2``.

        Raises:
            TypeError: If ``x`` is not floating point, ``t`` or ``class_labels``
                has the wrong type, or ``class_labels`` is given to an
                unconditional network, or ``r`` to a network without ``end_time``.
            ValueError: If ``x``, ``t``, ``r`` or ``class_labels`` has the wrong shape,
                or a label is out of range.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"MLP expects a floating-point tensor x, got {got}.")
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"MLP expects x of shape (bsz, input_dim) = (bsz, {self.input_dim}), "
                f"got shape {tuple(x.shape)}."
            )
        emb = self.condition(t, x, class_labels, r)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        out: Tensor = self.output(F.silu(self.output_norm(h)))
        return out
