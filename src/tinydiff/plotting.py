"""Pictures of 2D samples: scatter frames, side-by-side PNGs and training GIFs.

Needs the ``plot`` extra (matplotlib and pillow): ``pip install "tinydiff[plot]"``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["save_gif", "save_scatter_png", "scatter_frame"]


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


def _limits(panels: Sequence[Tensor]) -> float:
    return max(float(p[:, :2].abs().quantile(0.995)) for p in panels) * 1.15 + 1e-6


def scatter_frame(
    panels: Sequence[tuple[str, Tensor]], *, lim: float | None = None, dpi: int = 80
) -> Any:
    """Render scatter plots side by side into a PIL image.

    Args:
        panels: (title, points (n, 2)) pairs, one subplot each.
        lim: axis half-width (default: from the points).
        dpi: resolution.

    Returns:
        a ``PIL.Image.Image`` (RGB).
    """
    plt = _pyplot()
    from PIL import Image

    lim = _limits([p for _, p in panels]) if lim is None else lim
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
