"""Small UNet for images, in the style of DDPM / ADM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinydiff._validation import check_int, check_number
from tinydiff.nn._limits import MAX_DEPTH, MAX_WIDTH
from tinydiff.nn.embeddings import ConditionEmbedding

__all__ = ["UNet"]

_HEAD_DIM = 32  # attention uses channels // 32 heads when that divides evenly, else 1


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with a FiLM scale/shift from the conditioning.

    The residual block of ADM (Dhariwal & Nichol, 2021, "use_scale_shift_norm"):
    ``h = Conv(SiLU(GN(x)))``, ``h = GN(h) * (1 + scale) + shift``,
    ``out = skip(x) + Conv(Dropout(SiLU(h)))``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm_1 = nn.GroupNorm(num_groups, in_ch)
        self.conv_1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.modulation = nn.Linear(emb_dim, 2 * out_ch)
        self.norm_2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_1(F.silu(self.norm_1(x)))
        scale, shift = self.modulation(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_2(h) * (1 + scale) + shift
        h = self.conv_2(self.dropout(F.silu(h)))
        out: Tensor = self.skip(x) + h
        return out


class _SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels, with a residual connection."""

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = channels // _HEAD_DIM if channels % _HEAD_DIM == 0 else 1
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (b, 3c, h, w) -> (b, 3, heads, h*w, head_dim)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, h*w, head_dim)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        result: Tensor = x + self.proj(out)
        return result


class _Block(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        num_groups: int,
        dropout: float,
        attention: bool,
    ) -> None:
        super().__init__()
        self.res = _ResBlock(in_ch, out_ch, emb_dim, num_groups, dropout)
        self.attn: nn.Module = _SelfAttention(out_ch, num_groups) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        out: Tensor = self.attn(self.res(x, emb))
        return out


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class UNet(nn.Module):
    """Time-conditioned UNet for images (Ronneberger et al., 2015; Ho et al., 2020).

    A 3x3 input convolution, then one level per entry of ``channel_mults``
    (level ``i`` has ``base_channels * channel_mults[i]`` channels and
    resolution ``H / 2**i``) with ``num_res_blocks`` residual blocks each and a
    stride-2 convolution between levels; a middle block (residual, attention
    when the lowest level has attention, residual); and a mirrored up path with
    ``num_res_blocks + 1`` blocks per level, each fed the matching skip
    connection. Residual blocks use GroupNorm + SiLU with a scale/shift from the
    time(+label) embedding (ADM; Dhariwal & Nichol, 2021). The output
    convolution is zero-initialised, so an untrained network predicts 0.

    Args:
        in_channels: Number of image channels ``C``.
        base_channels: Channels at the first level; with ``num_groups`` it must
            divide ``base_channels * m`` for every ``m`` in ``channel_mults``.
        channel_mults: Channel multiplier per level; ``len(channel_mults) - 1``
            downsamplings, so H and W must be divisible by
            ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: Residual blocks per level on the down path.
        attention_resolutions: Indices into ``channel_mults`` of the levels that
            get self-attention after every residual block (0 is full
            resolution; negative indices count from the lowest resolution, so
            the default ``(-1,)`` means the lowest level only). Attention has
            ``channels // 32`` heads when that divides evenly, else one.
        time_embed_dim: Size of the conditioning vector; ``None`` means
            ``4 * base_channels``. The sinusoidal time embedding has
            ``base_channels`` features.
        out_mult: Output channels per input channel: 1 for a mean/noise
            prediction, 2 for the "learned_range" variance type (output
            ``(bsz, 2 * C, H, W)``; split it with ``.chunk(2, dim=1)``).
        num_classes: Number of classes for class conditioning, or ``None``.
            Label ``num_classes`` is the null label for classifier-free guidance.
        dropout: Dropout probability inside the residual blocks.
        num_groups: Number of GroupNorm groups.
        end_time: Also take an end time ``r`` (``net(x, t, r=r)``), embedded as ``t - r``,
            as for `tinydiff.nn.MLP` (two-time networks, e.g. MeanFlow).
        time_scale: Multiply ``t`` (and ``t - r``) by this before the time embedding, as for
            `tinydiff.nn.MLP` (0.1 suits MeanFlow).

    Attributes:
        null_class: The null label index (``num_classes``), or ``None``.
        config: The constructor arguments as a JSON-serializable dict; see
            :meth:`from_config`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (-1,),
        time_embed_dim: int | None = None,
        out_mult: int = 1,
        num_classes: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 8,
        end_time: bool = False,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(end_time, bool):
            raise TypeError(f"UNet end_time must be a bool, got {type(end_time).__name__}.")
        channel_mults, attention_resolutions = _check_arguments(
            in_channels,
            base_channels,
            channel_mults,
            num_res_blocks,
            attention_resolutions,
            time_embed_dim,
            out_mult,
            num_classes,
            dropout,
            num_groups,
        )
        self._config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "base_channels": int(base_channels),
            "channel_mults": [int(m) for m in channel_mults],
            "num_res_blocks": int(num_res_blocks),
            "attention_resolutions": [int(a) for a in attention_resolutions],
            "time_embed_dim": None if time_embed_dim is None else int(time_embed_dim),
            "out_mult": int(out_mult),
            "num_classes": None if num_classes is None else int(num_classes),
            "dropout": float(dropout),
            "num_groups": int(num_groups),
        }
        if end_time:  # only then: a one-time network's config reads as before
            self._config["end_time"] = True
        if time_scale != 1.0:
            self._config["time_scale"] = float(time_scale)
        self.end_time = end_time
        num_levels = len(channel_mults)
        self.in_channels = in_channels
        self.out_mult = out_mult
        self.null_class: int | None = num_classes
        self.size_multiple = 2 ** (num_levels - 1)

        emb_dim = 4 * base_channels if time_embed_dim is None else time_embed_dim
        attn_levels = {a % num_levels for a in attention_resolutions}

        def block(in_ch: int, out_ch: int, level: int) -> _Block:
            return _Block(in_ch, out_ch, emb_dim, num_groups, dropout, level in attn_levels)

        # keep both orders: creation draws the initial weights, assignment orders state_dict
        self.condition = ConditionEmbedding(
            base_channels, emb_dim, num_classes, end_time, time_scale
        )
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down_blocks, self.downsamplers, skip_channels = _down_path(
            block, base_channels, widths, num_res_blocks
        )
        ch = widths[-1]
        self.mid_blocks = nn.ModuleList(
            [block(ch, ch, num_levels - 1), _Block(ch, ch, emb_dim, num_groups, dropout, False)]
        )
        self.up_blocks, self.upsamplers = _up_path(block, widths, num_res_blocks, skip_channels)
        self.output_norm = nn.GroupNorm(num_groups, widths[0])
        self.output_conv = nn.Conv2d(widths[0], in_channels * out_mult, 3, padding=1)
        for p in self.output_conv.parameters():
            nn.init.zeros_(p)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (a fresh, JSON-serializable dict; tuples as lists)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet:
        """Build an (untrained) network from :attr:`config`.

        Args:
            config: A dict of constructor arguments, as in :attr:`config`; lists
                are accepted where the constructor takes tuples.

        Returns:
            A new network with the same architecture.
        """
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
        }
        return cls(**kwargs)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None = None,
        r: Tensor | float | None = None,
    ) -> Tensor:
        """Predict from noisy images ``x`` at times ``t`` (and end times ``r``).

        Follows the tinydiff network contract ``net(x_t, t, **cond) -> Tensor``, and
        ``net(x_t, t, r=r, **cond)`` when built with ``end_time=True``.

        Args:
            x: Noisy images of shape ``(bsz, in_channels, H, W)``, floating
                point, with H and W divisible by ``2 ** (len(channel_mults) - 1)``.
            t: Times on the ``[0, T]`` scale, ``(bsz,)`` or one number for the whole batch
                (as for `tinydiff.nn.MLP.forward`).
            class_labels: Labels ``(bsz,)`` in ``[0, num_classes]`` (``num_classes`` is the
                null label; None: all null), as for `tinydiff.nn.MLP.forward`.
            r: End times ``(bsz,)`` or 0-dim, only with ``end_time=True`` (``None``:
                ``r = t``), as for `tinydiff.nn.MLP.forward`.

        Returns:
            Tensor of shape ``(bsz, in_channels * out_mult, H, W)``: the same
            shape as ``x`` for ``out_mult=1``, ``(bsz, 2 * C, H, W)`` for
            ``out_mult=2``.

        Raises:
            TypeError: If ``x`` is not floating point, ``t`` or ``class_labels``
                has the wrong type, or ``class_labels`` is given to an
                unconditional network, or ``r`` to a network without ``end_time``.
            ValueError: If ``x``, ``t``, ``r`` or ``class_labels`` has the wrong shape,
                H or W is not divisible as required, or a label is out of range.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"UNet expects a floating-point tensor x, got {got}.")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects x of shape (bsz, in_channels, H, W) = "
                f"(bsz, {self.in_channels}, H, W), got shape {tuple(x.shape)}."
            )
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"UNet with {len(self.down_blocks)} levels needs H and W divisible by "
                f"{self.size_multiple}, got H={height}, W={width}; pad or resize the images."
            )
        emb = self.condition(t, x, class_labels, r)

        h = self.input_conv(x)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for blk in cast(nn.ModuleList, blocks):
                h = blk(h, emb)
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)
        for blk in self.mid_blocks:
            h = blk(h, emb)
        for level, blocks in enumerate(self.up_blocks):
            for blk in cast(nn.ModuleList, blocks):
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h)
        out: Tensor = self.output_conv(F.silu(self.output_norm(h)))
        return out


def _check_arguments(
    in_channels: int,
    base_channels: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    time_embed_dim: int | None,
    out_mult: int,
    num_classes: int | None,
    dropout: float,
    num_groups: int,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the arguments of `UNet`; channel_mults and attention_resolutions as tuples."""
    for name, seq in (
        ("channel_mults", channel_mults),
        ("attention_resolutions", attention_resolutions),
    ):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (tuple, list)):
            raise TypeError(f"UNet needs {name} as a tuple of ints, got {seq!r}")
    channel_mults = tuple(channel_mults)
    attention_resolutions = tuple(attention_resolutions)
    num_levels = len(channel_mults)
    for name, value, low, high in (
        ("in_channels", in_channels, 1, MAX_WIDTH),
        ("base_channels", base_channels, 2, MAX_WIDTH),
        ("num_res_blocks", num_res_blocks, 1, MAX_DEPTH),
        ("out_mult", out_mult, 1, 16),
        ("num_groups", num_groups, 1, MAX_WIDTH),
    ):
        check_int(name, value, min=low, max=high, owner="UNet")
    if num_levels == 0 or num_levels > 32:
        raise ValueError(
            f"UNet needs 1..32 channel_mults (one per level), got {len(channel_mults)}."
        )
    for m in channel_mults:
        check_int("each of channel_mults", m, min=1, max=MAX_WIDTH, owner="UNet")
    for a in attention_resolutions:
        check_int("each of attention_resolutions", a, min=-num_levels, owner="UNet")
    bad_levels = [a for a in attention_resolutions if not -num_levels <= a < num_levels]
    if bad_levels:
        raise ValueError(
            f"attention_resolutions are level indices into channel_mults, so they must "
            f"lie in [{-num_levels}, {num_levels - 1}]; got {list(attention_resolutions)}."
        )
    bad_widths = [base_channels * m for m in channel_mults if base_channels * m % num_groups]
    if bad_widths:
        raise ValueError(
            f"GroupNorm with num_groups={num_groups} needs every level width "
            f"base_channels * mult divisible by it; {bad_widths} are not. "
            f"Change base_channels or num_groups."
        )
    if time_embed_dim is not None:
        check_int("time_embed_dim", time_embed_dim, min=1, max=MAX_WIDTH, owner="UNet")
    if num_classes is not None:
        check_int("num_classes", num_classes, min=1, max=MAX_WIDTH, owner="UNet")
    check_number("dropout", dropout, min=0.0, owner="UNet")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet needs 0 <= dropout < 1, got dropout={dropout}.")
    return channel_mults, attention_resolutions


def _down_path(
    block: Callable[[int, int, int], _Block],
    base_channels: int,
    widths: list[int],
    num_res_blocks: int,
) -> tuple[nn.ModuleList, nn.ModuleList, list[int]]:
    """The residual blocks of each level and the stride-2 convolutions between levels, and
    the channels of every skip connection they leave (input convolution first)."""
    ch = base_channels
    skip_channels = [ch]
    down_blocks = nn.ModuleList()
    downsamplers = nn.ModuleList()
    for level, width in enumerate(widths):
        blocks = nn.ModuleList()
        for _ in range(num_res_blocks):
            blocks.append(block(ch, width, level))
            ch = width
            skip_channels.append(ch)
        down_blocks.append(blocks)
        if level < len(widths) - 1:
            downsamplers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            skip_channels.append(ch)
    return down_blocks, downsamplers, skip_channels


def _up_path(
    block: Callable[[int, int, int], _Block],
    widths: list[int],
    num_res_blocks: int,
    skip_channels: list[int],
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The mirrored up path, lowest resolution first: num_res_blocks + 1 blocks per level, each
    fed the last skip connection not yet used (``skip_channels`` is consumed), and the
    upsamplers between levels."""
    ch = widths[-1]
    up_blocks = nn.ModuleList()
    upsamplers = nn.ModuleList()
    for level in reversed(range(len(widths))):
        blocks = nn.ModuleList()
        for _ in range(num_res_blocks + 1):
            blocks.append(block(ch + skip_channels.pop(), widths[level], level))
            ch = widths[level]
        up_blocks.append(blocks)
        if level > 0:
            upsamplers.append(_Upsample(ch))
    return up_blocks, upsamplers
