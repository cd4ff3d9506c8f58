"""Pictures of samples: image grids, scatter frames of 2D points, side-by-side PNGs and
training GIFs.

Needs the `plot` extra (matplotlib and pillow): `pip install "tinydiff[plot]"`
([`image_grid`][tinydiff.plotting.image_grid] needs pillow only).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["axis_limit", "image_grid", "save_gif", "save_scatter_png", "scatter_frame"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plotting needs matplotlib and pillow: pip install "tinydiff[plot]"'
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('image_grid needs pillow: pip install "tinydiff[plot]"') from err
    return Image


def axis_limit(*point_sets: Tensor) -> float:
    """Half-width of square axes that show (almost) every point: 1.15 times the largest
    99.5% quantile of the absolute coordinates of the point sets, each (n, 2).

    Pass the same limit as `lim` to every [`scatter_frame`][tinydiff.plotting.scatter_frame]
    of an animation so that its axes stay fixed from frame to frame.
    """
    if not point_sets:
        raise ValueError("axis_limit needs at least one (n, 2) point set")
    return max(float(p[:, :2].abs().quantile(0.995)) for p in point_sets) * 1.15 + 1e-6


def image_grid(
    samples: Tensor,
    nrow: int = 8,
    path: str | Path | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
    pad_value: float = 0.0,
    scale: int = 1,
) -> Any:
    """Tile a batch of images into one picture, and save it as a PNG when `path` is given.

    The images are laid out row by row, `nrow` per row (the meaning of torchvision's
    `make_grid`), with `padding` pixels of `pad_value` around and between them. Values are
    clamped to `value_range` and mapped linearly to 0..255 (NaN becomes the low end).

    Args:
        samples: images, (N, C, H, W) with C = 1 (grey), 3 (RGB) or 4 (RGBA), or (N, H, W).
        nrow: images per row of the grid.
        path: where to write the PNG (its folder must exist); None writes nothing.
        value_range: (low, high) of the images' values; `model.sample` gives [-1, 1].
        padding: pixels between neighbouring images and around the grid.
        pad_value: brightness of the padding in [0, 1].
        scale: integer upscaling of every pixel (nearest neighbour), for small images.

    Returns:
        a `PIL.Image.Image` of size (ceil(N / nrow) * (H + padding) + padding) x
        (nrow' * (W + padding) + padding) times `scale`, with nrow' = min(nrow, N); mode "L",
        "RGB" or "RGBA" from C. `numpy.asarray(image)` gives its (height, width[, C]) uint8
        array.

    Raises:
        ValueError: `samples` is not (N, C, H, W) with C in (1, 3, 4) or is empty; `nrow`,
            `padding` or `scale` out of range; `value_range` not increasing.
    """
    if not isinstance(samples, Tensor):
        raise TypeError(
            f"samples must be a torch.Tensor (N, C, H, W), got {type(samples).__name__}"
        )
    if samples.dim() == 3:
        samples = samples[:, None]
    if samples.dim() != 4 or samples.shape[1] not in (1, 3, 4) or samples.shape[0] == 0:
        raise ValueError(
            f"samples must be a non-empty batch of images (N, C, H, W) with C in (1, 3, 4), got "
            f"shape {tuple(samples.shape)}; for a single image use samples[None]"
        )
    for name, value, low in (("nrow", nrow, 1), ("padding", padding, 0), ("scale", scale, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value must be in [0, 1], got {pad_value!r}")
    n, c, h, w = samples.shape
    x = samples.detach().to("cpu", torch.float64)
    x = ((torch.nan_to_num(x, nan=lo).clamp(lo, hi) - lo) / (hi - lo) * 255.0).round()
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding),
        round(pad_value * 255.0),
        dtype=torch.float64,
    )
    for k in range(n):
        top = padding + (k // cols) * (h + padding)
        left = padding + (k % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[k]
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid.to(torch.uint8).permute(1, 2, 0).numpy()
    image = _pil_image().fromarray(array[:, :, 0] if c == 1 else array)
    if path is not None:
        image.save(Path(path), format="PNG")
    return image


def scatter_frame(
    panels: Sequence[tuple[str, Tensor]], *, lim: float | None = None, dpi: int = 80
) -> Any:
    """Render scatter plots side by side into a PIL image.

    Args:
        panels: (title, points (n, 2)) pairs, one subplot each.
        lim: axis half-width (default: [`axis_limit`][tinydiff.plotting.axis_limit] of the
            points; pass one value to every frame of an animation to keep its axes fixed).
        dpi: resolution.

    Returns:
        a ``PIL.Image.Image`` (RGB).
    """
    plt = _pyplot()
    from PIL import Image

    lim = axis_limit(*(p for _, p in panels)) if lim is None else lim
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), dpi=dpi, squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels, strict=True):
        pts = pts.detach().cpu().float()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def save_scatter_png(path: str | Path, panels: Sequence[tuple[str, Tensor]]) -> Path:
    """Write side-by-side scatter plots of 2D point sets to a PNG file; returns the path."""
    path = Path(path)
    scatter_frame(panels, dpi=100).save(path)
    return path


def save_gif(path: str | Path, frames: Sequence[Any], duration_ms: int = 300) -> Path:
    """Write PIL frames as a looping GIF; returns the path."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    frames[0].save(
        path, save_all=True, append_images=list(frames[1:]), duration=duration_ms, loop=0
    )
    return path
