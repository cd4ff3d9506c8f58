"""Time and class-label embeddings shared by the networks in :mod:`tinydiff.nn`.

Every tinydiff network is called as ``net(x_t, t, **cond)``: ``x_t`` has shape
``(bsz, *input_shape)`` and ``t`` is a float tensor of shape ``(bsz,)`` on the
``[0, T]`` time scale (``T = num_timesteps``, 1000 by default), usually
integer-valued but possibly fractional. :class:`ConditionEmbedding` turns ``t``
(and optional class labels) into one conditioning vector per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinydiff._validation import check_int

__all__ = ["ConditionEmbedding", "SinusoidalTimeEmbedding"]


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of a continuous time ``t``.

    The Transformer position encoding (Vaswani et al., 2017, "Attention Is All
    You Need", Sec. 3.5) applied to the diffusion time as in DDPM (Ho et al.,
    2020). With ``h = dim // 2`` and frequencies ``w_k = max_period ** (-k / h)``
    for ``k = 0, ..., h - 1``::

        emb(t) = [cos(w_0 t), ..., cos(w_{h-1} t), sin(w_0 t), ..., sin(w_{h-1} t)]

    so ``<emb(t), emb(s)> = sum_k cos(w_k (t - s))`` depends only on ``t - s``.
    For odd ``dim`` a zero column is appended. ``t`` may be fractional.

    Args:
        dim: Size of the embedding, at least 2.
        max_period: Longest period ``1 / w_{h-1}`` is close to; the shortest is
            ``2 * pi``. Must be greater than 1.

    Shape:
        - Input: ``(bsz,)``, any real dtype (integers are converted).
        - Output: ``(bsz, dim)``, float32 (float64 if ``t`` is float64).
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        check_int("dim", dim, min=2, owner="SinusoidalTimeEmbedding")
        super().__init__()
        if dim < 2:
            raise ValueError(f"SinusoidalTimeEmbedding needs dim >= 2, got dim={dim}.")
        if max_period <= 1:
            raise ValueError(
                f"SinusoidalTimeEmbedding needs max_period > 1, got max_period={max_period}."
            )
        self.dim = dim
        self.max_period = float(max_period)

    def forward(self, t: Tensor) -> Tensor:
        """Embed a batch of times.

        Args:
            t: Times of shape ``(bsz,)``.

        Returns:
            Embeddings of shape ``(bsz, dim)``.
        """
        if t.ndim != 1:
            raise ValueError(
                f"SinusoidalTimeEmbedding expects t of shape (bsz,), got shape {tuple(t.shape)}."
            )
        # Computed in at least float32: t * w_0 reaches T = 1000, far beyond what
        # half precision can resolve. The frequencies are rebuilt on every call
        # (a handful of elements) so that casting the module never degrades them.
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = self.dim // 2
        k = torch.arange(half, device=t.device, dtype=dtype)
        freqs = torch.exp(k * (-math.log(self.max_period) / half))
        args = t.to(dtype)[:, None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}"


class ConditionEmbedding(nn.Module):
    """Conditioning vector from the time and, optionally, a class label.

    ``t -> SinusoidalTimeEmbedding(freq_dim) -> Linear -> SiLU -> Linear``, plus a
    learned label embedding when ``num_classes`` is given. The label table has
    ``num_classes + 1`` rows: index ``num_classes`` is the "null" label used for
    classifier-free guidance (Ho & Salimans, 2022), and ``class_labels=None``
    means every sample gets the null label.

    With ``end_time=True`` the network also takes an end time ``r`` <= ``t`` (a two-time
    network, e.g. the average velocity u(x_t, r, t) of MeanFlow): the same sinusoidal
    embedding of the interval ``t - r``, through its own ``Linear -> SiLU -> Linear``, is
    added to the conditioning vector (Geng et al. 2025, "Mean Flows for One-step Generative
    Modeling", sec. 4: the network is conditioned on (t, t - r)). Its output layer starts at
    zero, so an untrained two-time network is its one-time self for every ``r``, and
    ``r=None`` means ``r = t`` (an interval of length 0: the instantaneous velocity).

    It also validates ``t``, ``r`` and ``class_labels`` against the batch, so the
    networks share one set of checks and error messages.

    Args:
        freq_dim: Size of the sinusoidal embedding.
        embed_dim: Size of the output conditioning vector.
        num_classes: Number of classes, or ``None`` for an unconditional network.
        end_time: Also embed an end time ``r`` (see above).
        time_scale: Multiply ``t`` (and ``t - r``) by this before the sinusoidal embedding.
            1 (the default) embeds network times as they are; two-time networks trained
            with MeanFlow do better with 0.1: their loss differentiates the network in
            s = t / T, and at scale 1 the fastest feature turns T radians per unit of s
            (`benchmarks/results/few_step.md`).
    """

    def __init__(
        self,
        freq_dim: int,
        embed_dim: int,
        num_classes: int | None = None,
        end_time: bool = False,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        ok = isinstance(time_scale, (int, float)) and not isinstance(time_scale, bool)
        if not (ok and 0 < time_scale < math.inf):
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}.")
        self.time_scale = float(time_scale)
        self.sinusoidal = SinusoidalTimeEmbedding(freq_dim)
        self.linear_1 = nn.Linear(freq_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.num_classes = num_classes
        self.label_embedding: nn.Embedding | None = (
            None if num_classes is None else nn.Embedding(num_classes + 1, embed_dim)
        )
        self.end_time = bool(end_time)
        self.interval_embedding: nn.Sequential | None = None
        if end_time:
            last = nn.Linear(embed_dim, embed_dim)
            self.interval_embedding = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), last)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(
        self,
        t: Tensor | float,
        x: Tensor,
        class_labels: Tensor | None = None,
        r: Tensor | float | None = None,
    ) -> Tensor:
        """Embed ``t``, ``class_labels`` (and the interval ``t - r``) for the batch ``x``.

        Args:
            t: Times on the ``[0, T]`` scale, shape ``(bsz,)``. A 0-dim tensor or
                a Python number is broadcast to every sample.
            x: The network input of shape ``(bsz, ...)``; only its batch size and
                device are used.
            class_labels: Integer labels of shape ``(bsz,)`` in
                ``[0, num_classes]`` (``num_classes`` is the null label), or
                ``None`` for all-null.
            r: End times on the ``[0, T]`` scale, shape ``(bsz,)`` or 0-dim, for a network
                built with ``end_time=True``; ``None`` means ``r = t``.

        Returns:
            Conditioning vectors of shape ``(bsz, embed_dim)``.

        Raises:
            TypeError: ``r`` given to a network built without ``end_time``.
        """
        t = _batched_time(t, x)
        scale = self.time_scale
        freq = self.sinusoidal(t if scale == 1.0 else t * scale).to(self.linear_1.weight.dtype)
        emb: Tensor = self.linear_2(F.silu(self.linear_1(freq)))
        if self.interval_embedding is not None:
            interval = torch.zeros_like(t) if r is None else t - _batched_time(r, x, "r")
            interval = interval if scale == 1.0 else interval * scale
            emb = emb + self.interval_embedding(self.sinusoidal(interval).to(freq.dtype))
        elif r is not None:
            raise TypeError(
                "an end time r was given but this network was built without end_time; "
                "construct it with end_time=True to embed r (a two-time network, e.g. for "
                "training_objective='meanflow')."
            )
        if self.label_embedding is None:
            if class_labels is not None:
                raise TypeError(
                    "class_labels were given but this network was built without "
                    "num_classes; construct it with num_classes=<number of classes> "
                    "to condition on labels."
                )
            return emb
        label_emb: Tensor = self.label_embedding(self._labels(class_labels, x))
        return emb + label_emb

    def _labels(self, class_labels: Tensor | None, x: Tensor) -> Tensor:
        null = self.num_classes
        assert null is not None  # only called when a label table exists
        bsz = x.shape[0]
        if class_labels is None:
            return torch.full((bsz,), null, dtype=torch.long, device=x.device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(
                f"class_labels must be an integer tensor of shape (bsz,), "
                f"got {type(class_labels).__name__}."
            )
        dtype = class_labels.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor, got dtype {dtype}.")
        if class_labels.shape != (bsz,):
            raise ValueError(
                f"class_labels must have shape (bsz,) = ({bsz},), "
                f"got shape {tuple(class_labels.shape)}."
            )
        # The range check reads the values back from the device, which neither
        # torch.compile nor CUDA-graph capture can do; skip it there.
        if not _is_tracing(class_labels):
            bad = (class_labels < 0) | (class_labels > null)
            if bool(bad.any()):
                raise ValueError(
                    f"class_labels must lie in [0, {null}] ({null} is the null label "
                    f"for classifier-free guidance), got {class_labels[bad].tolist()}."
                )
        return class_labels.to(device=x.device, dtype=torch.long)


def _batched_time(t: Tensor | float, x: Tensor, name: str = "t") -> Tensor:
    """Check ``t`` (argument ``name``) against the batch of ``x``; return it as ``(bsz,)``."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), device=x.device)
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name} must be a float tensor of shape (bsz,) or a number, got {type(t).__name__}."
        )
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a real (float or integer) tensor, got dtype {t.dtype}.")
    bsz = x.shape[0]
    if t.ndim == 0:
        t = t.expand(bsz)
    elif t.shape != (bsz,):
        raise ValueError(
            f"{name} must have shape (bsz,) = ({bsz},) matching x, or be 0-dim to be "
            f"broadcast; got shape {tuple(t.shape)}."
        )
    return t.to(x.device)


def _is_tracing(tensor: Tensor) -> bool:
    """True under torch.compile or while a CUDA graph is being captured."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    return tensor.is_cuda and bool(torch.cuda.is_current_stream_capturing())
